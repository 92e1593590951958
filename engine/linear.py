"""A linear layer that can carry a LoRA adapter and a per-row MeZO perturbation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .forward_batch import Perturbation


class AdaptableLinear(torch.nn.Module):
    """y = x Wᵀ + b (+ s·x Aᵀ Bᵀ), with the noise of a perturbation added inside the kernel.

    Trainable tensors (LoRA A/B, or W itself in full-parameter mode) are fp32 and carry a global
    `index` each: under perturbation p the noise seed of a tensor is `derive_seed(sample_seed_p, index)`,
    nothing else.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = torch.nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.bias = (
            torch.nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
            if bias
            else None
        )
        self.lora_a: torch.Tensor | None = None  # [r, in] fp32
        self.lora_b: torch.Tensor | None = None  # [out, r] fp32
        self.lora_scale = 0.0
        self.index_a = self.index_b = self.index_w = -1  # trainable-tensor indices, -1 = not trainable
        self.kernels = "torch"  # "torch" | "triton": set for every linear by the engine's `kernels` switch

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def set_lora(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)} do not fit a {self.out_features}x{self.in_features} linear"
            )
        self.lora_a = a.to(device=self.weight.device, dtype=torch.float32).contiguous()
        self.lora_b = b.to(device=self.weight.device, dtype=torch.float32).contiguous()
        self.lora_scale = float(scale)

    def clear_lora(self) -> None:
        self.lora_a = self.lora_b = None
        self.lora_scale = 0.0
        self.index_a = self.index_b = -1

    def forward(self, x: torch.Tensor, perturbation: Perturbation | None = None) -> torch.Tensor:
        perturbed = perturbation is not None and (self.index_a >= 0 or self.index_w >= 0)
        if perturbed or (self.has_lora and self.kernels == "triton"):
            # the fused kernel serves unperturbed LoRA forwards too (all rows σ = 0), so evaluation and
            # generation run exactly the kernel that the MeZO branches run
            return self._noisy(x, perturbation if perturbed else None)
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:  # full-parameter mode keeps fp32 weights under bf16/fp16 activations
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        y = F.linear(x, w, b)
        if self.has_lora:
            t = F.linear(x.float(), self.lora_a)
            y = (y.float() + self.lora_scale * F.linear(t, self.lora_b)).to(x.dtype)
        return y

    def _noisy(self, x: torch.Tensor, perturbation: Perturbation | None) -> torch.Tensor:
        from kernels import noisy_lora_linear  # deferred: triton loads only when needed

        if perturbation is None:  # unperturbed: every row has σ = 0 (the noise terms vanish exactly)
            signs = torch.zeros(x.numel() // x.shape[-1], dtype=torch.float32, device=x.device)
            return noisy_lora_linear(x, self.weight, self.lora_a, self.lora_b, signs=signs, seed_a=0, seed_b=0,
                                     eps=0.0, scale=self.lora_scale, bias=self.bias, impl=self.kernels)
        p = perturbation

        def seeds(index: int) -> int | list[int]:
            if index < 0:
                return 0
            s = p.tensor_seeds(index)
            return s[0] if p.token_ids is None else s  # one perturbation: the id-less launch

        eps = p.eps[0] if p.token_ids is None else list(p.eps)
        return noisy_lora_linear(
            x,
            self.weight,
            self.lora_a,
            self.lora_b,
            signs=p.token_signs,
            seed_a=seeds(self.index_a),
            seed_b=seeds(self.index_b),
            eps=eps,
            scale=self.lora_scale,
            bias=self.bias,
            weight_seed=seeds(self.index_w) if self.index_w >= 0 else None,
            perturbation_ids=p.token_ids,
            rows_by_id=p.rows_by_id() if self.kernels == "torch" else None,  # the Triton kernel never needs them
            impl=self.kernels,
        )
