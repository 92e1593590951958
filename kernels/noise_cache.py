"""A bounded memo of materialized noise for the torch (CPU) paths.

One MeZO step runs several forward launches (shared prefix, suffixes, both branches) and then
the update, all with the same z: regenerating Philox + Box-Muller each time dominated the CPU
step. The GPU kernels never use this; they generate noise inside the matmul.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from .noise import randn

MAX_CACHE_BYTES = 1 << 30

_cache: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_cache_bytes = 0


def cached_randn(seed: int, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """`randn(seed, shape)` (offset 0), memoized by (seed, shape, device), least recently used evicted.
    The returned tensor is shared: never modify it in place."""
    global _cache_bytes
    dev = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    key = (int(seed), numel, str(dev))  # keyed by element count: z depends only on the flat index
    hit = _cache.get(key)
    if hit is not None:
        _cache.move_to_end(key)
        return hit.view(shape)
    z = randn(seed, (numel,), device=dev)
    size = z.numel() * 4
    if size <= MAX_CACHE_BYTES:
        _cache[key] = z
        _cache_bytes += size
        while _cache_bytes > MAX_CACHE_BYTES:
            _, old = _cache.popitem(last=False)
            _cache_bytes -= old.numel() * 4
    return z.view(shape)


def clear_noise_cache() -> None:
    global _cache_bytes
    _cache.clear()
    _cache_bytes = 0
