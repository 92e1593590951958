"""A bounded memo of materialized noise for the torch (CPU) paths.

One MeZO step runs several forward launches (shared prefix, suffixes, both branches) and then
the update, all with the same z: regenerating Philox + Box-Muller each time dominated the CPU
step. The GPU kernels never use this; they generate noise inside the matmul.

The memo trades memory for time, and MeZO's promise is inference-level memory, so it is bounded:
the trainer sets the limit from the model's size (kernels keep working, only slower, past it) and
clears the memo after each update. Within a step the same tensors are read in the same order by
every launch, a cyclic pattern under which LRU eviction would miss every time; so once the memo is
full, new noise is simply not kept, and the tensors that came first keep hitting.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .noise import randn

DEFAULT_LIMIT_BYTES = 256 << 20

_cache: dict[tuple, torch.Tensor] = {}
_cache_bytes = 0
_limit_bytes = DEFAULT_LIMIT_BYTES


def cached_randn(seed: int, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """`randn(seed, shape)` (offset 0), memoized by (seed, numel, device) while the memo has room.
    The returned tensor may be shared: never modify it in place."""
    global _cache_bytes
    dev = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    key = (int(seed), numel, str(dev))  # keyed by element count: z depends only on the flat index
    hit = _cache.get(key)
    if hit is not None:
        return hit.view(shape)
    z = randn(seed, (numel,), device=dev)
    if _cache_bytes + numel * 4 <= _limit_bytes:
        _cache[key] = z
        _cache_bytes += numel * 4
    return z.view(shape)


def set_noise_cache_limit(nbytes: int) -> int:
    """Bound the memo (0 disables it); returns the previous limit. Entries over the new limit go."""
    global _limit_bytes
    if nbytes < 0:
        raise ValueError(f"noise cache limit must be >= 0 bytes, got {nbytes}")
    previous, _limit_bytes = _limit_bytes, int(nbytes)
    if _cache_bytes > _limit_bytes:
        clear_noise_cache()
    return previous


def noise_cache_bytes() -> int:
    return _cache_bytes


def clear_noise_cache() -> None:
    global _cache_bytes
    _cache.clear()
    _cache_bytes = 0
