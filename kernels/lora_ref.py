"""Torch reference for the noisy LoRA linear (DESIGN.md section 5): materializes the noise.

It is the CPU path of the engine and the oracle for the fused Triton kernel in ``kernels.lora``.
All LoRA and noise arithmetic runs in float32; the result is cast back to ``x.dtype``.

A launch may carry P perturbations (n-SPSA samples, one-sided copies): row i runs at
θ + σ_i ε_{p_i} Z_{p_i}, where p_i = perturbation_ids[i] picks one of P seed triples (Z_A, Z_B, Z_W)
and one ε. With P = 1 and no ids every row uses perturbation 0 (the two-branch MeZO launch).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .lora_tables import Eps, Seeds, host_values, perturbation_count, perturbation_tables, row_ids
from .noise_cache import cached_randn

__all__ = ["lora_noise", "noisy_lora_linear_ref", "perturbation_table", "rows_by_perturbation"]


def lora_noise(seed_a: int, seed_b: int, shape_a: tuple[int, ...], shape_b: tuple[int, ...],
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z_A, Z_B): the float32 noise the kernels perturb LoRA A and B by (offset 0, row-major)."""
    return cached_randn(seed_a, shape_a, device=device), cached_randn(seed_b, shape_b, device=device)


def perturbation_table(seed_a: Seeds, seed_b: Seeds, eps: Eps, weight_seed: Seeds | None = None
                       ) -> tuple[list[int], list[int], list[float], list[int] | None]:
    """Normalize the per-perturbation arguments to lists of one length P (ints broadcast to P).

    ValueError when two of them give different P > 1, or P == 0.
    """
    cols = {"seed_a": host_values(seed_a, int), "seed_b": host_values(seed_b, int), "eps": host_values(eps, float)}
    if weight_seed is not None:
        cols["weight_seed"] = host_values(weight_seed, int)
    p = perturbation_count({name: len(v) for name, v in cols.items()})
    out = {name: v * p if len(v) == 1 else v for name, v in cols.items()}
    return out["seed_a"], out["seed_b"], out["eps"], out.get("weight_seed")


def rows_by_perturbation(signs: torch.Tensor, perturbation_ids: torch.Tensor, num_perturbations: int
                         ) -> list[torch.Tensor]:
    """For each perturbation p, the int64 indices of the rows with id p and a non-zero sign.

    Reads the ids back (a host sync on a GPU): the engine builds these lists on the host instead and
    passes them as ``rows_by_id``.
    """
    active = signs.reshape(-1) != 0
    ids = perturbation_ids.reshape(-1)
    return [torch.nonzero(active & (ids == p)).reshape(-1) for p in range(num_perturbations)]


def _row_scale(signs: torch.Tensor, eps: list[float], ids: torch.Tensor | None, m: int,
               eps_table: torch.Tensor | None = None) -> torch.Tensor:
    """sigma_i * eps_{p_i} as a float32 column [M, 1] (sign and eps both float32, one rounding).
    With ids, ``eps_table`` is the float32 ε of every perturbation on the signs' device."""
    s = signs.reshape(-1)
    if s.numel() != m:
        raise ValueError(f"signs has {s.numel()} entries for {m} rows")
    if ids is None:
        return (s.to(torch.float32) * eps[0]).unsqueeze(1)
    return (s.to(torch.float32) * eps_table[ids.reshape(-1).long()]).unsqueeze(1)


def noisy_lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
                          lora_b: torch.Tensor | None, *, signs: torch.Tensor, seed_a: Seeds, seed_b: Seeds,
                          eps: Eps, scale: float, bias: torch.Tensor | None = None,
                          weight_seed: Seeds | None = None, perturbation_ids: torch.Tensor | None = None,
                          rows_by_id: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """y_i = x_i W^T + b + s (t_i B^T + σ_i ε t_i Z_B^T), t_i = x_i A^T + σ_i ε x_i Z_A^T (+ σ_i ε x_i Z_W^T),
    with Z and ε those of row i's perturbation p_i.

    ``seed_a``/``seed_b``/``weight_seed``/``eps``: one value, or P values (one per perturbation);
    ``perturbation_ids``: None (every row is perturbation 0; then P must be 1) or an int tensor [M]
    with values in [0, P); ``rows_by_id``: optional precomputed `rows_by_perturbation` (no host sync).
    Rows with σ = 0 never touch the noise. The sign multiplies after the products, exactly like the
    fused kernel, so both are the same function of (x, θ, seeds, signs, ids); tests check it against
    explicit θ ± εZ separately. ValueError for inconsistent P or row counts, or (host ids) an id
    outside [0, P), as in the fused kernel; TypeError for non-integer ids.
    """
    seeds_a, seeds_b, eps_list, seeds_w = perturbation_table(seed_a, seed_b, eps, weight_seed)
    num_p = len(eps_list)
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).to(torch.float32)
    m = xf.shape[0]
    # the Triton path's checks and messages (P > 1 needs ids, one per row, host ids in [0, P))
    # (rows_by_id come from the engine, which checked every id on the host before the launch)
    ids, stride = row_ids(perturbation_ids, m, num_p, x.device, check_range=rows_by_id is None)
    ids = ids if stride else None
    # the ε table from the launch tables' value-keyed cache: no per-layer blocking copy on a GPU
    eps_table = None if ids is None else perturbation_tables(seeds_a, seeds_b, eps_list, seeds_w, x.device).eps
    se = _row_scale(signs.to(x.device), eps_list, ids, m, eps_table)
    a = b = None
    if lora_a is not None:
        if lora_b is None:
            raise ValueError("lora_a given without lora_b")
        a, b = lora_a.to(torch.float32), lora_b.to(torch.float32)

    if ids is None:  # one perturbation, every row (σ = 0 rows get a zero scale): the two-branch launch
        y = xf @ weight.to(torch.float32).t()
        if seeds_w is not None:
            z_w = cached_randn(seeds_w[0], weight.shape, device=x.device)
            y = y + se * (xf @ z_w.t())
        if bias is not None:
            y = y + bias.to(torch.float32)
        if a is not None:
            z_a, z_b = lora_noise(seeds_a[0], seeds_b[0], a.shape, b.shape, device=x.device)
            t = xf @ a.t() + se * (xf @ z_a.t())
            y = y + float(scale) * (t @ b.t() + se * (t @ z_b.t()))
        return y.to(x.dtype).reshape(*lead, n)

    # several perturbations: each one's noise products only for its own rows (gathered), so the
    # noise work is that of one perturbation over the M rows, whatever P is
    if rows_by_id is None:
        rows_by_id = rows_by_perturbation(signs.to(x.device), ids, num_p)
    if len(rows_by_id) != num_p:
        raise ValueError(f"rows_by_id has {len(rows_by_id)} entries for {num_p} perturbations")
    groups = [(p, rows.to(x.device)) for p, rows in enumerate(rows_by_id) if rows.numel()]
    y = xf @ weight.to(torch.float32).t()
    if seeds_w is not None:
        for p, rows in groups:
            z_w = cached_randn(seeds_w[p], weight.shape, device=x.device)
            y.index_add_(0, rows, se[rows] * (xf[rows] @ z_w.t()))
    if bias is not None:
        y = y + bias.to(torch.float32)
    if a is not None:
        t = xf @ a.t()
        for p, rows in groups:
            z_a = cached_randn(seeds_a[p], a.shape, device=x.device)
            t.index_add_(0, rows, se[rows] * (xf[rows] @ z_a.t()))
        y = y + float(scale) * (t @ b.t())
        for p, rows in groups:
            z_b = cached_randn(seeds_b[p], b.shape, device=x.device)
            y.index_add_(0, rows, float(scale) * (se[rows] * (t[rows] @ z_b.t())))
    return y.to(x.dtype).reshape(*lead, n)
