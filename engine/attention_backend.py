"""Choice of attention implementation over the paged KV pool (DESIGN §7)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels
from kernels import attention as attn

BACKENDS = ("auto", "torch", "triton", "flash_attn")


@dataclass
class AttentionBackend:
    """Dispatches extend/decode to one implementation; `auto` = Triton on GPU, torch on CPU."""

    name: str

    @classmethod
    def select(cls, requested: str, device: torch.device, page_size: int) -> "AttentionBackend":
        if requested not in BACKENDS:
            raise ValueError(f"attention_backend={requested!r} is not one of {BACKENDS}")
        if requested == "flash_attn":
            if not (device.type == "cuda" and attn.flash_attn_available() and page_size % 256 == 0):
                raise ValueError(
                    "attention_backend='flash_attn' needs CUDA, an importable flash_attn and page_size % 256 == 0"
                )
            return cls("flash_attn")
        if requested == "auto":
            if device.type != "cuda":
                return cls("torch")
            if attn.flash_attn_available() and page_size % 256 == 0:
                return cls("flash_attn")
            return cls("triton" if kernels.HAS_TRITON else "torch")
        if requested == "triton" and not kernels.HAS_TRITON:
            raise ValueError("attention_backend='triton' needs the package 'triton', which is not installed "
                             "(Linux: pip install triton); use attention_backend='torch'")
        return cls(requested)

    def extend(self, q, k_pool, v_pool, batch, sm_scale: float) -> torch.Tensor:
        if self.name == "flash_attn":
            return attn.extend_attention_flash(q, k_pool, v_pool, batch.page_table, batch.qo_indptr, batch.prefix_lens, sm_scale)
        return attn.extend_attention(
            q, k_pool, v_pool, batch.page_table, batch.qo_indptr, batch.prefix_lens, sm_scale, impl=self.name
        )

    def decode(self, q, k_pool, v_pool, batch, sm_scale: float) -> torch.Tensor:
        if self.name == "flash_attn":
            return attn.decode_attention_flash(q, k_pool, v_pool, batch.page_table, batch.seq_lens, sm_scale)
        return attn.decode_attention(q, k_pool, v_pool, batch.page_table, batch.seq_lens, sm_scale, impl=self.name)
