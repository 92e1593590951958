"""Choice of attention implementation over the paged KV pool (DESIGN §7)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels import attention as attn

from .kernel_choice import check_triton_device, resolve_kernels

BACKENDS = ("auto", "torch", "triton", "flash_attn")


@dataclass
class AttentionBackend:
    """Dispatches extend/decode to one implementation ("torch", "triton" or "flash_attn").

    `attention_backend="auto"` follows the engine's `kernels` switch: kernels="torch" -> torch,
    kernels="triton" -> triton, kernels="auto" -> flash_attn on CUDA when it is importable and
    page_size % 256 == 0, else what kernels="auto" resolves to (triton on CUDA, torch elsewhere).
    An explicit attention_backend overrides the switch for attention only.
    """

    name: str

    @classmethod
    def select(cls, requested: str, device: torch.device, page_size: int, kernels: str = "auto") -> "AttentionBackend":
        if requested not in BACKENDS:
            raise ValueError(f"attention_backend={requested!r} is not one of {BACKENDS}")
        flash_ok = device.type == "cuda" and attn.flash_attn_available() and page_size % 256 == 0
        if requested == "flash_attn":
            if not flash_ok:
                raise ValueError(
                    "attention_backend='flash_attn' needs CUDA, an importable flash_attn and page_size % 256 == 0"
                )
            return cls("flash_attn")
        if requested == "auto":
            if kernels == "auto" and flash_ok:
                return cls("flash_attn")
            return cls(resolve_kernels(kernels, device))
        if requested == "triton":
            check_triton_device(device, "attention_backend='triton'")
        return cls(requested)

    def extend(self, q, k_pool, v_pool, batch, sm_scale: float) -> torch.Tensor:
        # the batch's host-side lengths size the launch: no .max() on device tensors in any layer
        plan = None
        if self.name == "torch" and q.shape[0] and batch.page_table.shape[0]:
            # the index tensors and mask depend on the batch only: built by the first layer, reused
            heads, kv_heads, page_size = q.shape[1], k_pool.shape[2], k_pool.shape[1]
            plan = batch.memo(("extend_plan", heads, kv_heads, page_size),
                              lambda: self._extend_plan(q.shape[0], batch, page_size, heads, kv_heads))
        return attn.extend_attention(q, k_pool, v_pool, batch.page_table, batch.qo_indptr, batch.prefix_lens,
                                     sm_scale, impl=self.name, max_extend_len=batch.max_extend_len,
                                     max_seq_len=batch.max_seq_len, plan=plan)

    @staticmethod
    def _extend_plan(num_tokens: int, batch, page_size: int, heads: int, kv_heads: int):
        # a pass mixing long and short sequences gets one padded SDPA per group of similar sizes
        if batch.extend_lens_host is not None and batch.seq_lens_host is not None:
            groups = attn.extend_groups_torch(batch.page_table, batch.qo_indptr, batch.prefix_lens,
                                              batch.extend_lens_host, batch.seq_lens_host, page_size, heads, kv_heads)
            if groups is not None:
                return groups
        return attn.extend_plan_torch(num_tokens, batch.page_table, batch.qo_indptr, batch.prefix_lens, page_size,
                                      heads, kv_heads, batch.max_extend_len, batch.max_seq_len)

    def decode(self, q, k_pool, v_pool, batch, sm_scale: float) -> torch.Tensor:
        plan = None
        if self.name == "torch" and q.shape[0]:  # as in extend: the gather rows and mask once per forward
            heads, kv_heads, page_size = q.shape[1], k_pool.shape[2], k_pool.shape[1]
            plan = batch.memo(("decode_plan", heads, kv_heads, page_size), lambda: attn.decode_plan_torch(
                batch.page_table, batch.seq_lens, page_size, heads, kv_heads, batch.max_seq_len))
        return attn.decode_attention(q, k_pool, v_pool, batch.page_table, batch.seq_lens, sm_scale, impl=self.name,
                                     max_seq_len=batch.max_seq_len, plan=plan)
