"""‖z‖ of a perturbation over all trainable tensors, for ``normalize_perturbations`` (issue 14).

A perturbation's z is the concatenation of randn(seed_j, shape_j) over the trainable tensors j; its
norm needs one extra pass of the generator (nothing is stored). Sums of squares accumulate in float64.

The Triton path launches ONE kernel for all (perturbation, tensor, chunk of counters): each program
sums tl.randn² over its chunk in float32 (<= chunk/block terms per lane, then a tree sum), and the
partial sums are reduced per perturbation in float64 on the device (no host sync).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._triton import tl, triton  # a stand-in when Triton is not installed
from .launch_config import noise_norm_config, target_of
from ._device import host_to_device, signed64
from .noise import randn
from .noise_cache import cached_randn

__all__ = ["perturbation_norms"]

_CHUNK = 1 << 20  # elements generated at a time by the torch path (bounds its float32 temporaries)


def _sq_sum_torch(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    if numel <= _CHUNK:  # a LoRA-sized tensor: the step's z is in the memo already (prefetched)
        return cached_randn(seed, (numel,), device=device).double().square().sum()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, numel, _CHUNK):
        z = randn(seed, (min(_CHUNK, numel - start),), offset=start, device=device)
        total += z.double().square().sum()
    return total


@triton.jit
def _sq_sum_kernel(seed_ptr, start_ptr, count_ptr, out_ptr, BLOCK: tl.constexpr):
    """out[g] = Σ_{i < count[g]} randn(seed[g], start[g] + i)² (float32) for program g."""
    g = tl.program_id(0)
    seed = tl.load(seed_ptr + g)
    start = tl.load(start_ptr + g)
    count = tl.load(count_ptr + g)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i0 in range(0, count, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        z = tl.randn(seed, start + idx)  # int32 counters: every tensor has < 2^31 elements
        acc += tl.where(idx < count, z * z, 0.0)
    tl.store(out_ptr + g, tl.sum(acc, axis=0))


def _sq_sums_triton(tensor_seeds: Sequence[Sequence[int]], numels: Sequence[int], device: torch.device
                    ) -> torch.Tensor:
    """float64 [P] sums of squares: one launch over every (p, tensor, chunk), float64 reduction."""
    num_p = len(tensor_seeds)
    chunk = noise_norm_config(target_of(device)).chunk
    starts, counts, tensor_of = [], [], []
    for j, n in enumerate(numels):
        for s in range(0, int(n), chunk):
            starts.append(s)
            counts.append(min(chunk, int(n) - s))
            tensor_of.append(j)
    c = len(starts)
    if num_p == 0 or c == 0:
        return torch.zeros(num_p, dtype=torch.float64, device=device)
    seeds = torch.tensor([[signed64(s) for s in row] for row in tensor_seeds], dtype=torch.int64)
    prog_seed = seeds[:, torch.tensor(tensor_of)].reshape(-1)                   # [P * C], p-major
    prog_start = torch.tensor(starts, dtype=torch.int32).repeat(num_p)
    prog_count = torch.tensor(counts, dtype=torch.int32).repeat(num_p)
    partial = torch.empty(num_p * c, dtype=torch.float32, device=device)
    cfg = noise_norm_config(target_of(device))
    _sq_sum_kernel[(num_p * c,)](*(host_to_device(t, device) for t in (prog_seed, prog_start, prog_count)), partial,
                                 BLOCK=cfg.block, num_warps=cfg.num_warps)
    return partial.view(num_p, c).double().sum(dim=1)


def perturbation_norms(tensor_seeds: Sequence[Sequence[int]], numels: Sequence[int],
                       device: torch.device | str | None = None, impl: str = "torch") -> torch.Tensor:
    """float64 [P]: ‖z_p‖ = sqrt(Σ_j Σ_i randn(tensor_seeds[p][j], numels[j])[i]²) for each perturbation p.

    ``tensor_seeds[p][j]`` is the Philox seed of trainable tensor j under perturbation p (from
    ``derive_seed``); ``numels[j]`` its element count. impl: "torch" (the exact generator) or "triton"
    (one kernel launch on ``device``; the interpreter on CPU). Both give the same norms within ~1e-6
    relative (tl.randn's float32 log/cos differ from the correctly rounded twin by an ulp now and then).
    ValueError when a row of seeds does not have one seed per tensor, for a negative element count, or
    (triton) for a tensor of 2^31 elements or more.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    for p, row in enumerate(tensor_seeds):
        if len(row) != len(numels):
            raise ValueError(f"tensor_seeds[{p}] has {len(row)} seeds for {len(numels)} tensors")
    for j, n in enumerate(numels):
        if int(n) < 0:
            raise ValueError(f"numels[{j}] = {n} is negative")
    if impl == "triton":
        too_big = [(j, int(n)) for j, n in enumerate(numels) if int(n) >= 1 << 31]
        if too_big:
            raise ValueError(f"tensors {too_big} have >= 2^31 elements: the kernels' noise counters are int32")
        return _sq_sums_triton(tensor_seeds, numels, device).sqrt()
    if impl != "torch":
        raise ValueError(f"unknown impl {impl!r}")
    out = torch.zeros(len(tensor_seeds), dtype=torch.float64, device=device)
    for p, row in enumerate(tensor_seeds):
        out[p] = sum((_sq_sum_torch(int(s), int(n), device) for s, n in zip(row, numels)),
                     torch.zeros((), dtype=torch.float64, device=device))
    return out.sqrt()
