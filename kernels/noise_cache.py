"""A bounded memo of materialized noise for the torch (CPU) paths.

One MeZO step runs several forward launches (shared prefix, suffixes, both branches) and then
the update, all with the same z: regenerating Philox + Box-Muller each time dominated the CPU
step. The GPU kernels never use this; they generate noise inside the matmul.

The memo trades memory for time, and MeZO's promise is inference-level memory, so it is bounded:
the trainer sets the limit from the model's size (kernels keep working, only slower, past it) and
clears the memo after each update. Within a step the same tensors are read in the same order by
every launch, a cyclic pattern under which LRU eviction would miss every time; so once the memo is
full, new noise is simply not kept, and the tensors that came first keep hitting.

`prefetch_noise` fills the memo for a whole step before its first launch in ONE batched Philox
pass (`randn_segments`): a LoRA step has ~100 small tensors, whose one-by-one generation was a
fixed per-step cost that data parallelism could not shrink.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Sequence

import torch

from .noise import derive_seed, randn, randn_segments

DEFAULT_LIMIT_BYTES = 256 << 20

_cache: dict[tuple, torch.Tensor] = {}
_cache_bytes = 0
_limit_bytes = DEFAULT_LIMIT_BYTES


def _key(seed: int, numel: int, device: torch.device) -> tuple[int, int, str]:
    """The memo's key, shared by `cached_randn` and `prefetch_noise` so a prefetch is always found: keyed
    by element count, since z depends only on the flat index."""
    return int(seed), int(numel), str(device)


def cached_randn(seed: int, shape: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """`randn(seed, shape)` (offset 0), memoized by (seed, numel, device) while the memo has room.
    The returned tensor may be shared: never modify it in place."""
    global _cache_bytes
    dev = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    key = _key(seed, numel, dev)
    hit = _cache.get(key)
    if hit is not None:
        return hit.view(shape)
    z = randn(seed, (numel,), device=dev)
    if _cache_bytes + numel * 4 <= _limit_bytes:
        _cache[key] = z
        _cache_bytes += numel * 4
    return z.view(shape)


def prefetch_noise(seeds: Sequence[int], numels: Sequence[int], device: torch.device | str | None = None) -> int:
    """Put ``randn(seeds[j], numels[j])`` into the memo for every j, generated in one batched pass.

    The same keeping rule as `cached_randn` (in order, each one kept if it still fits under the
    limit; entries already held are skipped), and the same bits: a later `cached_randn` of a
    prefetched (seed, numel) returns exactly what it would have generated. Returns the bytes added. Raises ValueError
    when the lengths differ or a numel is negative.
    """
    global _cache_bytes
    if len(seeds) != len(numels):
        raise ValueError(f"prefetch_noise: {len(seeds)} seeds but {len(numels)} numels")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    keys: list[tuple[int, int, str]] = []
    taken: set[tuple[int, int, str]] = set()
    room = _limit_bytes - _cache_bytes
    for seed, numel in zip(seeds, numels):
        key = _key(seed, numel, dev)
        if key[1] < 0:
            raise ValueError(f"prefetch_noise: numels must be >= 0, got {key[1]}")
        if key in _cache or key in taken or key[1] * 4 > room:
            continue  # held already, or no room: that tensor's z stays lazy, as cached_randn leaves it
        keys.append(key)
        taken.add(key)
        room -= key[1] * 4
    if not keys:
        return 0
    flat = randn_segments([k[0] for k in keys], [k[1] for k in keys], device=dev)
    added, pos = 0, 0
    for key in keys:
        _cache[key] = flat[pos:pos + key[1]]  # views of one buffer: it lives until the memo is cleared
        pos += key[1]
        added += key[1] * 4
    _cache_bytes += added
    return added


def prefetch_step_noise(sample_seeds: Sequence[int], tensors: Sequence[torch.Tensor],
                        tensor_seed: Callable[[int, int], int] = derive_seed) -> int:
    """`prefetch_noise` for one MeZO step: z of every trainable tensor (index = place in ``tensors``)
    for every sample seed, seeded ``tensor_seed(sample_seed, index)``. Tensors are grouped by
    device; returns the bytes added."""
    by_device: dict[torch.device, tuple[list[int], list[int]]] = {}
    for seed in sample_seeds:
        for index, t in enumerate(tensors):
            seeds, numels = by_device.setdefault(t.device, ([], []))
            seeds.append(tensor_seed(int(seed), index))
            numels.append(t.numel())
    return sum(prefetch_noise(seeds, numels, device=dev) for dev, (seeds, numels) in by_device.items())


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
