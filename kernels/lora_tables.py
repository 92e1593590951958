"""Per-launch perturbation tables of the fused noisy LoRA linear (issue 14): seeds and ε on the device.

A launch carries P perturbations; the kernels read perturbation p's Philox seeds (A, B, W) and its ε
from four device tables indexed by p, and each row's p from an int32 id tensor. The tables come from:

- device tensors given by the caller (e.g. a per-step [tensors, P] seed table built once): used as
  they are, no copy and no host sync (start them 16-byte aligned, e.g. rows of an even P, or Triton
  compiles the kernels once more for the unaligned pointers);
- host values (ints, floats, lists, CPU tensors): packed into ONE int64 buffer, copied to the device
  in one transfer, and kept in a small LRU keyed by the values, so repeated launches with the same
  seeds (every unperturbed forward, both branches' layers across micro-batches) copy nothing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import torch

from ._device import host_to_device, signed64

__all__ = ["PerturbationTables", "perturbation_tables", "row_ids", "host_to_device", "host_values",
           "perturbation_count", "Seeds", "Eps"]

Seeds = int | Sequence[int] | torch.Tensor
Eps = float | Sequence[float] | torch.Tensor
_T = TypeVar("_T")
_CACHE_SIZE = 1024  # distinct host tables kept on the device (a few hundred bytes each)


@dataclass(frozen=True)
class PerturbationTables:
    """Device tables of one launch: seed_a/seed_b/seed_w int64 [>= P], eps float32 [>= P]."""

    seed_a: torch.Tensor
    seed_b: torch.Tensor
    seed_w: torch.Tensor
    eps: torch.Tensor
    num: int  # P


def host_values(values: Seeds | Eps, cast: Callable[[object], _T]) -> list[_T]:
    """One per-perturbation argument as a host list: a scalar gives one entry, a sequence or tensor
    its (flattened) entries, each through ``cast`` (a device tensor is read back: a host sync)."""
    if isinstance(values, torch.Tensor):
        return [cast(v) for v in values.reshape(-1).tolist()]
    if isinstance(values, (list, tuple)):
        return [cast(v) for v in values]
    return [cast(values)]


def perturbation_count(lengths: dict[str, int]) -> int:
    """P from the entry counts of the per-perturbation arguments (name -> count): each has one entry
    (broadcast) or P. ValueError naming the counts when two give different P > 1, or P == 0."""
    p = max(lengths.values())
    bad = {name: n for name, n in lengths.items() if n not in (1, p)}
    if p == 0 or bad:
        raise ValueError(f"per-perturbation arguments must all have one entry or the same number P >= 1 of "
                         f"entries, got lengths {lengths}")
    return p


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _packed(device: torch.device, seeds_a: tuple, seeds_b: tuple, seeds_w: tuple, eps: tuple) -> PerturbationTables:
    """One int64 [4, P2] buffer (P2 = P rounded up to even, so that every row starts 16-byte aligned
    and Triton specializes the four pointers the same way for every P); row 3 holds the float32 ε."""
    p = len(eps)
    p2 = p + (p & 1)
    host = torch.zeros(4, p2, dtype=torch.int64)
    host[0, :p] = torch.tensor(seeds_a, dtype=torch.int64)
    host[1, :p] = torch.tensor(seeds_b, dtype=torch.int64)
    host[2, :p] = torch.tensor(seeds_w, dtype=torch.int64)
    host[3].view(torch.float32)[:p] = torch.tensor(eps, dtype=torch.float32)
    dev = host_to_device(host, device)
    return PerturbationTables(dev[0], dev[1], dev[2], dev[3].view(torch.float32), p)


def perturbation_tables(seed_a: Seeds, seed_b: Seeds, eps: Eps, weight_seed: Seeds | None,
                        device: torch.device) -> PerturbationTables:
    """The four device tables for one launch. Each argument is one value or P values; a tensor on
    ``device`` is used without a copy (broadcast on the device when it has one entry). ValueError when
    two arguments give different P > 1, or one gives none."""
    if all(isinstance(v, (int, float)) for v in (seed_a, seed_b, eps)) and isinstance(weight_seed, (int, type(None))):
        # the id-less launch (one perturbation, host scalars): straight to the cached table
        return _packed(device, (signed64(seed_a),), (signed64(seed_b),), (signed64(weight_seed or 0),), (float(eps),))
    given = {"seed_a": seed_a, "seed_b": seed_b, "eps": eps, "weight_seed": 0 if weight_seed is None else weight_seed}
    on_device = {k: isinstance(v, torch.Tensor) and v.device == device for k, v in given.items()}
    lengths = {k: (v.numel() if isinstance(v, torch.Tensor) else len(v) if isinstance(v, (list, tuple)) else 1)
               for k, v in given.items()}
    p = perturbation_count(lengths)
    if not any(on_device.values()):
        cols = {k: host_values(v, float if k == "eps" else signed64) for k, v in given.items()}
        cols = {k: tuple(v * p if len(v) == 1 else v) for k, v in cols.items()}
        return _packed(device, cols["seed_a"], cols["seed_b"], cols["weight_seed"], cols["eps"])
    out = {}
    for k, v in given.items():
        dtype = torch.float32 if k == "eps" else torch.int64
        if on_device[k]:
            t = v.reshape(-1).to(dtype)
        else:  # a host value next to device tables: a (small) copy of its own
            t = host_to_device(torch.tensor(host_values(v, float if k == "eps" else signed64), dtype=dtype), device)
        out[k] = (t.expand(p) if t.numel() == 1 else t).contiguous()
    return PerturbationTables(out["seed_a"], out["seed_b"], out["weight_seed"], out["eps"], p)


@functools.lru_cache(maxsize=16)
def _zero_id(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def row_ids(perturbation_ids: torch.Tensor | None, m: int, num: int, device: torch.device,
            check_range: bool = True) -> tuple[torch.Tensor, int]:
    """(int32 ids on ``device``, stride): without ids one cached zero read with stride 0 (no per-call
    allocation). ValueError when P > 1 without ids, for a wrong row count, or (for host ids, checked
    without a device sync; ``check_range=False`` when the caller validated them) ids outside [0, P)."""
    if perturbation_ids is None:
        if num != 1:
            raise ValueError(f"{num} perturbations given but no perturbation_ids to say which row uses which")
        return _zero_id(device), 0
    if perturbation_ids.is_floating_point() or perturbation_ids.is_complex() or perturbation_ids.dtype == torch.bool:
        raise TypeError(f"perturbation_ids must be an integer tensor, got {perturbation_ids.dtype}")
    ids = perturbation_ids.reshape(-1)
    if ids.numel() != m:
        raise ValueError(f"perturbation_ids has {ids.numel()} entries for {m} rows")
    if check_range and ids.device.type == "cpu" and m and (int(ids.min()) < 0 or int(ids.max()) >= num):
        raise ValueError(f"perturbation_ids must lie in [0, {num}), got values in "
                         f"[{int(ids.min())}, {int(ids.max())}]")
    if ids.device.type == "cpu":
        return host_to_device(ids.to(torch.int32).contiguous(), device), 1
    return ids.to(device=device, dtype=torch.int32).contiguous(), 1
