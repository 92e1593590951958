"""Rotary position embedding with the frequencies transformers would use for the same config."""
from __future__ import annotations

from typing import Any

import torch


def _rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None)  # transformers >= 5
    if params:
        return dict(params)
    scaling = dict(getattr(config, "rope_scaling", None) or {})  # transformers 4.x
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return scaling


def inverse_frequencies(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention_scaling); scaled RoPE types come from transformers itself."""
    params = _rope_parameters(config)
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = float(params.get("rope_theta", 10000.0))
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (theta**exponents), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"rope_type={rope_type!r} is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv_freq.float(), float(scaling)


class RotaryEmbedding(torch.nn.Module):
    """Precomputed cos/sin tables indexed by absolute position (ragged batches need no padding)."""

    def __init__(self, config: Any, head_dim: int, max_positions: int):
        super().__init__()
        inv_freq, scaling = inverse_frequencies(config, head_dim)
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, H, D], k [T, Hkv, D] rotated at their positions (rotate-half convention, as in HF LLaMA).
        ``tables``: `tables(positions)` when the caller has them (the same for every layer of a pass)."""
        cos, sin = self.tables(positions) if tables is None else tables
        return _rotate(q, cos, sin), _rotate(k, cos, sin)

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) rows of ``positions`` [T]: float32 [T, 1, D] each."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(dtype)
