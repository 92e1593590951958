"""Per-pass values shared by the layers (ForwardBatch.memo): the torch attention plans (extend and
decode) and the RoPE tables are built once per forward pass, and using them changes no bit of the output."""
from __future__ import annotations

import pytest
import torch

from kernels import attention_ref
from kernels.attention import decode_attention_torch, decode_plan_torch, extend_attention_torch, extend_plan_torch
from test_attention_kernels import DECODE_CASES, EXTEND_CASES, make_decode, make_extend


@pytest.mark.parametrize("case", EXTEND_CASES[:4])
def test_extend_with_a_plan_is_bit_identical(case):
    head_dim, group, hkv, page_size, prefix, ext, _ = case
    q, k_pool, v_pool, pt, qo, pre, _, _ = make_extend(prefix, ext, page_size, hkv, group, head_dim,
                                                       torch.float32, "cpu")
    plan = extend_plan_torch(q.shape[0], pt, qo, pre, page_size, q.shape[1], hkv, max(ext), max(p + e for p, e in zip(prefix, ext)))
    for layer in range(2):  # the same plan serves several layers (other q, other KV pools)
        q_l, k_l, v_l = q * (layer + 1), k_pool - layer, v_pool * 0.5
        want = extend_attention_torch(q_l, k_l, v_l, pt, qo, pre, head_dim ** -0.5)
        got = extend_attention_torch(q_l, k_l, v_l, pt, qo, pre, head_dim ** -0.5, plan=plan)
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="plan"):
        extend_attention_torch(q[:-1], k_pool, v_pool, pt, qo, pre, 0.1, plan=plan)


@pytest.mark.parametrize("case", DECODE_CASES[:3])
def test_decode_with_a_plan_is_bit_identical(case):
    head_dim, group, hkv, page_size, seq_lens, _, _ = case
    q, k_pool, v_pool, pt, sl, _, _ = make_decode(seq_lens, page_size, hkv, group, head_dim, torch.float32, "cpu")
    plan = decode_plan_torch(pt, sl, page_size, q.shape[1], hkv, max(seq_lens))
    for layer in range(2):
        q_l, k_l, v_l = q * (layer + 1), k_pool - layer, v_pool * 0.5
        want = decode_attention_torch(q_l, k_l, v_l, pt, sl, head_dim ** -0.5)
        assert torch.equal(decode_attention_torch(q_l, k_l, v_l, pt, sl, head_dim ** -0.5, plan=plan), want)
    with pytest.raises(ValueError, match="plan"):
        decode_attention_torch(q[:-1], k_pool, v_pool, pt[:-1], sl[:-1], 0.1, plan=plan)


def test_engine_builds_the_plan_and_rope_tables_once_per_pass(monkeypatch):
    from engine import SamplingParams
    from engine.rope import RotaryEmbedding
    from mezo_helpers import make_engine

    engine = make_engine()
    prompts = ["Headline: Rivals draw in tense derby\nTopic:", "Headline: Chip maker unveils\nTopic:"]
    plans, tables = [], []
    decode_plans = []
    real_plan, real_tables = attention_ref.extend_plan_torch, RotaryEmbedding.tables
    real_decode_plan = attention_ref.decode_plan_torch
    monkeypatch.setattr("kernels.attention.extend_plan_torch", lambda *a, **k: plans.append(1) or real_plan(*a, **k))
    monkeypatch.setattr("kernels.attention.decode_plan_torch",
                        lambda *a, **k: decode_plans.append(1) or real_decode_plan(*a, **k))
    monkeypatch.setattr(RotaryEmbedding, "tables", lambda self, pos: tables.append(1) or real_tables(self, pos))
    passes = engine.runner.forward_passes
    engine.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))  # prefill only
    extends = engine.runner.forward_passes - passes
    assert extends >= 1 and len(plans) == extends and len(tables) == extends
    assert engine.spec.num_layers > 1  # (otherwise once per pass would prove nothing)
    passes = engine.runner.forward_passes
    engine.generate(prompts, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # + 3 decode passes
    decodes = engine.runner.forward_passes - passes - 1  # the prefill pass before them is an extend
    assert decodes >= 1 and len(decode_plans) == decodes
