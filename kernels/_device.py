"""Small host-side helpers the kernels share: queued host→device copies and Philox seed bits."""
from __future__ import annotations

import torch

__all__ = ["host_to_device", "signed64"]

_M64 = (1 << 64) - 1


def host_to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor to ``device`` without a host sync: a plain (pageable, blocking) copy
    makes torch synchronize the stream; a pinned non_blocking one is only queued (the caching host
    allocator keeps the pinned block alive until the copy has run). On the CPU: a plain ``.to``."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def signed64(seed: int) -> int:
    """The int64 with the same 64 bits as seed mod 2^64 (Philox keys on the bits, like kernels.randn),
    so any int seed fits an int64 tensor."""
    s = int(seed) & _M64
    return s - (1 << 64) if s >= 1 << 63 else s
