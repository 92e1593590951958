"""Torch reference for the noisy LoRA linear (DESIGN.md section 5): materializes the noise.

It is the CPU path of the engine and the oracle for the fused Triton kernel in ``kernels.lora``.
All LoRA and noise arithmetic runs in float32; the result is cast back to ``x.dtype``.
"""
from __future__ import annotations

import torch

from .noise_cache import cached_randn

__all__ = ["lora_noise", "noisy_lora_linear_ref"]


def lora_noise(seed_a: int, seed_b: int, shape_a: tuple[int, ...], shape_b: tuple[int, ...],
               device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z_A, Z_B): the float32 noise the kernels perturb LoRA A and B by (offset 0, row-major)."""
    return cached_randn(seed_a, shape_a, device=device), cached_randn(seed_b, shape_b, device=device)


def _row_scale(signs: torch.Tensor, eps: float, m: int) -> torch.Tensor:
    """sigma_i * eps as a float32 column [M, 1]."""
    s = signs.reshape(-1)
    if s.numel() != m:
        raise ValueError(f"signs has {s.numel()} entries for {m} rows")
    return (s.to(torch.float32) * float(eps)).unsqueeze(1)


def noisy_lora_linear_ref(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
                          lora_b: torch.Tensor | None, *, signs: torch.Tensor, seed_a: int, seed_b: int,
                          eps: float, scale: float, bias: torch.Tensor | None = None,
                          weight_seed: int | None = None) -> torch.Tensor:
    """y_i = x_i W^T + b + s (t_i B^T + σ_i ε t_i Z_B^T), t_i = x_i A^T + σ_i ε x_i Z_A^T (+ σ_i ε x_i Z_W^T).

    The sign multiplies after the products, exactly like the fused kernel, so both are the same
    function of (x, θ, seeds, signs); tests check it against explicit θ ± εZ separately.
    """
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    xf = x.reshape(-1, k).to(torch.float32)
    se = _row_scale(signs.to(x.device), eps, xf.shape[0])
    y = xf @ weight.to(torch.float32).t()
    if weight_seed is not None:
        z_w = cached_randn(weight_seed, weight.shape, device=x.device)
        y = y + se * (xf @ z_w.t())
    if bias is not None:
        y = y + bias.to(torch.float32)
    if lora_a is not None:
        if lora_b is None:
            raise ValueError("lora_a given without lora_b")
        a, b = lora_a.to(torch.float32), lora_b.to(torch.float32)
        z_a, z_b = lora_noise(seed_a, seed_b, a.shape, b.shape, device=x.device)
        t = xf @ a.t() + se * (xf @ z_a.t())
        y = y + float(scale) * (t @ b.t() + se * (t @ z_b.t()))
    return y.to(x.dtype).reshape(*lead, n)
