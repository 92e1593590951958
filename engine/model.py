"""LLaMA-family decoder over a ragged batch and a paged KV pool.

Parameter names match transformers' LlamaForCausalLM so a HF state dict loads as is.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .attention_backend import AttentionBackend
from .forward_batch import ForwardBatch
from .kv_pool import KVPool
from .linear import AdaptableLinear
from .model_config import ModelSpec
from .rope import RotaryEmbedding


class RMSNorm(torch.nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device=None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, dtype: torch.dtype, device=None):
        super().__init__()
        h, d, kvh = spec.hidden_size, spec.head_dim, spec.num_kv_heads
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, kvh, d
        self.scale = d**-0.5
        bias = spec.attention_bias
        self.q_proj = AdaptableLinear(h, spec.num_heads * d, bias, dtype, device)
        self.k_proj = AdaptableLinear(h, kvh * d, bias, dtype, device)
        self.v_proj = AdaptableLinear(h, kvh * d, bias, dtype, device)
        self.o_proj = AdaptableLinear(spec.num_heads * d, h, spec.o_proj_bias, dtype, device)

    def forward(self, x, batch: ForwardBatch, kv: KVPool, rope: RotaryEmbedding, backend: AttentionBackend):
        p = batch.perturbation
        t = x.shape[0]
        q = self.q_proj(x, p).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, p).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, p).view(t, self.num_kv_heads, self.head_dim)
        q, k = rope(batch.positions, q, k, batch.memo("rope", lambda: rope.tables(batch.positions)))
        kv.write(self.layer_idx, batch.out_cache_loc, k, v)
        k_pool, v_pool = kv.k_pools[self.layer_idx], kv.v_pools[self.layer_idx]
        if batch.mode == "decode":
            o = backend.decode(q, k_pool, v_pool, batch, self.scale)
        else:
            o = backend.extend(q, k_pool, v_pool, batch, self.scale)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim), p)


class MLP(torch.nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device=None):
        super().__init__()
        h, i, bias = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = AdaptableLinear(h, i, bias, dtype, device)
        self.up_proj = AdaptableLinear(h, i, bias, dtype, device)
        self.down_proj = AdaptableLinear(i, h, bias, dtype, device)

    def forward(self, x, batch: ForwardBatch):
        p = batch.perturbation
        return self.down_proj(F.silu(self.gate_proj(x, p)) * self.up_proj(x, p), p)


class DecoderLayer(torch.nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.self_attn = Attention(spec, layer_idx, dtype, device)
        self.mlp = MLP(spec, dtype, device)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)

    def forward(self, x, batch, kv, rope, backend):
        x = x + self.self_attn(self.input_layernorm(x), batch, kv, rope, backend)
        return x + self.mlp(self.post_attention_layernorm(x), batch)


class LlamaBody(torch.nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device=None):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = torch.nn.ModuleList(DecoderLayer(spec, i, dtype, device) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)


class CausalLM(torch.nn.Module):
    """The decoder plus LM head; `forward` returns hidden states only at `batch.logits_indices`."""

    def __init__(self, spec: ModelSpec, hf_config: Any, dtype: torch.dtype, device=None, max_positions: int | None = None):
        super().__init__()
        self.spec = spec
        self.model = LlamaBody(spec, dtype, device)
        self.lm_head = None
        if not spec.tie_word_embeddings:
            self.lm_head = torch.nn.Linear(spec.hidden_size, spec.vocab_size, bias=False, dtype=dtype, device=device)
            self.lm_head.weight.requires_grad_(False)
        self.rope = RotaryEmbedding(hf_config, spec.head_dim, max_positions or spec.max_position_embeddings)
        if device is not None:
            self.rope.to(device)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv: KVPool, backend: AttentionBackend) -> torch.Tensor:
        x = self.model.embed_tokens(batch.input_ids)
        for layer in self.model.layers:
            x = layer(x, batch, kv, self.rope, backend)
        return self.model.norm(x[batch.logits_indices])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits of the selected rows only (never the full [T, vocab] matrix)."""
        return F.linear(hidden, self.head_weight).float()

    def linears(self) -> dict[str, AdaptableLinear]:
        """Every adaptable projection by its HF module path (e.g. 'model.layers.0.self_attn.q_proj')."""
        return {n: m for n, m in self.named_modules() if isinstance(m, AdaptableLinear)}
