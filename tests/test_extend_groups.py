"""The torch extend path's padding groups (kernels.attention_ref.group_by_padding / extend_groups_torch):
a pass mixing long and short sequences runs one padded SDPA per group of similar sizes, with the
same attention output as one padded call and as the naive softmax, and the engine uses them."""
from __future__ import annotations

import pytest
import torch

from kernels.attention_ref import (PADDING_WASTE, SPLIT_MIN_AREA, extend_attention_torch, extend_groups_torch,
                                   extend_plan_torch, group_by_padding)
from test_attention_kernels import make_extend, naive_attention


def test_grouping_bounds_the_padding_and_keeps_every_sequence():
    ext = [795, 36, 40, 33, 795, 1, 0, 12, 700]
    kv = [795, 831, 835, 828, 795, 900, 10, 100, 700]
    groups = group_by_padding(ext, kv)
    assert sorted(b for g in groups for b in g) == list(range(len(ext)))
    for g in groups:  # every group within the waste bound (a lone sequence always is)
        padded = len(g) * max(ext[b] for b in g) * max(kv[b] for b in g)
        assert len(g) == 1 or padded <= PADDING_WASTE * sum(ext[b] * kv[b] for b in g) + len(g) * SPLIT_MIN_AREA
    assert any({0, 4} <= set(g) for g in groups), "the two 795-token prompts share a group"
    assert not any({0, 1} <= set(g) for g in groups), "a prompt and a short suffix are never padded together"
    assert group_by_padding([13, 15, 20, 11], [13, 15, 20, 11]) == [[2, 1, 0, 3]]  # similar sizes: one call
    assert len(group_by_padding([16, 40, 3], [16, 40, 3])) == 1  # short prompts: another call costs more
    assert len(group_by_padding([36] * 120, [831] * 120)) == 1  # a MeZO suffix launch


@pytest.mark.parametrize("prefix,ext", [([0, 790, 790, 0, 780], [795, 36, 1, 700, 40]),
                                        ([0, 5, 60, 0], [64, 3, 2, 0])])
def test_groups_match_one_padded_call_and_the_naive_softmax(prefix, ext):
    head_dim, group, hkv, page_size = 64, 3, 1, 16
    q, k_pool, v_pool, pt, qo, pre, ks, vs = make_extend(prefix, ext, page_size, hkv, group, head_dim,
                                                          torch.float32, "cpu")
    seq = [p + e for p, e in zip(prefix, ext)]
    groups = extend_groups_torch(pt, qo, pre, ext, seq, page_size, q.shape[1], hkv, min_area=0)  # split small too
    assert groups is not None and len(groups) >= 2
    scale = head_dim ** -0.5
    got = extend_attention_torch(q, k_pool, v_pool, pt, qo, pre, scale, plan=groups)
    one = extend_attention_torch(q, k_pool, v_pool, pt, qo, pre, scale,
                                 plan=extend_plan_torch(q.shape[0], pt, qo, pre, page_size, q.shape[1], hkv))
    torch.testing.assert_close(got, one, atol=1e-6, rtol=1e-6)
    for b in range(len(ext)):
        rows = slice(int(qo[b]), int(qo[b + 1]))
        want = naive_attention(q[rows], ks[b], vs[b], [prefix[b] + i for i in range(ext[b])], scale)
        torch.testing.assert_close(got[rows].double(), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="groups"):
        extend_attention_torch(q[:-1], k_pool, v_pool, pt, qo, pre, scale, plan=groups)


def test_similar_sequences_keep_the_single_plan():
    prefix, ext = [0, 3, 11], [5, 4, 6]
    q, _, _, pt, qo, pre, _, _ = make_extend(prefix, ext, 16, 1, 2, 64, torch.float32, "cpu")
    assert extend_groups_torch(pt, qo, pre, ext, [p + e for p, e in zip(prefix, ext)], 16, 2, 1) is None


def test_engine_groups_a_mixed_pass_with_the_same_logits(monkeypatch):
    """One prefill of a long and a short prompt: grouped (the engine's choice) vs forced into one
    padded call give the same logits at every position."""
    from engine.attention_backend import AttentionBackend
    from mezo_helpers import make_engine

    engine = make_engine()
    prompts = [engine.encode("Headline: " + "markets rally as investors weigh the latest figures " * 40 + "\nTopic:"),
               engine.encode("Hi there")]
    assert len(prompts[0]) > 8 * len(prompts[1])
    plans = []
    real = AttentionBackend._extend_plan
    monkeypatch.setattr(AttentionBackend, "_extend_plan", staticmethod(lambda *a: plans.append(real(*a)) or plans[-1]))
    grouped = engine.prompt_logits(prompts)
    assert any(isinstance(p, list) for p in plans), "the mixed prefill was not grouped"
    monkeypatch.setattr("kernels.attention.extend_groups_torch", lambda *a, **k: None)
    engine.reset_cache()
    single = engine.prompt_logits(prompts)
    for a, b in zip(grouped, single):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
