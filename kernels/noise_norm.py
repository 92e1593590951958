"""‖z‖ of a perturbation over all trainable tensors, for ``normalize_perturbations`` (issue 14).

A perturbation's z is the concatenation of randn(seed_j, shape_j) over the trainable tensors j; its
norm needs one extra pass of the generator (nothing is stored). Sums of squares accumulate in float64.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .noise import randn

__all__ = ["perturbation_norms"]

_CHUNK = 1 << 20  # elements generated at a time by the torch path (bounds its float32 temporaries)


def _sq_sum_torch(seed: int, numel: int, device: torch.device) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, numel, _CHUNK):
        z = randn(seed, (min(_CHUNK, numel - start),), offset=start, device=device)
        total += z.double().square().sum()
    return total


def perturbation_norms(tensor_seeds: Sequence[Sequence[int]], numels: Sequence[int],
                       device: torch.device | str | None = None, impl: str = "torch") -> torch.Tensor:
    """float64 [P]: ‖z_p‖ = sqrt(Σ_j Σ_i randn(tensor_seeds[p][j], numels[j])[i]²) for each perturbation p.

    ``tensor_seeds[p][j]`` is the Philox seed of trainable tensor j under perturbation p (from
    ``derive_seed``); ``numels[j]`` its element count. impl: "torch" (the exact generator) or "triton".
    ValueError when a row of seeds does not have one seed per tensor.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    for p, row in enumerate(tensor_seeds):
        if len(row) != len(numels):
            raise ValueError(f"tensor_seeds[{p}] has {len(row)} seeds for {len(numels)} tensors")
    if impl == "triton":
        raise NotImplementedError("Triton sum of squares: being built (issue 14)")
    if impl != "torch":
        raise ValueError(f"unknown impl {impl!r}")
    out = torch.zeros(len(tensor_seeds), dtype=torch.float64, device=device)
    for p, row in enumerate(tensor_seeds):
        out[p] = sum((_sq_sum_torch(int(s), int(n), device) for s, n in zip(row, numels)),
                     torch.zeros((), dtype=torch.float64, device=device))
    return out.sqrt()
