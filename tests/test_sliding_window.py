"""Sliding-window configs (Mistral, Qwen2) are refused unless the window is a no-op (issue 12.5)."""
from __future__ import annotations

import pytest
import torch
from test_engine_equivalence import check_ragged_with_cache, hf_logits
from tiny_models import random_prompts

from engine import Engine

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def _mistral(**kw):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    hf = MistralForCausalLM(MistralConfig(**{**SMALL, **kw})).eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return hf


def _qwen2(**kw):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**{**SMALL, **kw})).eval()


def _engine(hf) -> Engine:
    return Engine.from_hf(hf, page_size=4, max_cache_tokens=2048, dtype="float32", device="cpu")


def test_mistral_sliding_window_is_refused() -> None:
    with pytest.raises(ValueError, match=r"sliding_window=8 on 3 of 3 layers .* context \(512 tokens.*max_model_len=8"):
        _engine(_mistral(sliding_window=8))
    with pytest.raises(ValueError, match="sliding_window=511"):  # one short of the longest sequence
        _engine(_mistral(sliding_window=511))


def test_qwen2_sliding_window_is_refused() -> None:
    with pytest.raises(ValueError, match=r"use_sliding_window/sliding_window: sliding_window=8 on 2 of 3 layers"):
        _engine(_qwen2(use_sliding_window=True, sliding_window=8, max_window_layers=1))


@pytest.mark.parametrize("kind, kw", [
    ("mistral", dict(sliding_window=None)),
    ("mistral", dict(sliding_window=512)),  # covers every position the model can hold: plain causal
    ("qwen2", dict(use_sliding_window=False, sliding_window=8)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=3)),  # no layer uses it
])
def test_no_op_windows_run_and_match_transformers(kind: str, kw: dict) -> None:
    hf = _mistral(**kw) if kind == "mistral" else _qwen2(**kw)
    check_ragged_with_cache(_engine(hf), hf, 256, seed=4)


def test_max_model_len_within_the_window_runs_exactly() -> None:
    """Mistral with sliding_window=16 runs when the context is capped at 16 tokens (the window is then
    a no-op): logits equal transformers', cached prefixes included, and generation stops at the cap."""
    hf = _mistral(sliding_window=16)
    engine = Engine.from_hf(hf, page_size=4, max_cache_tokens=512, dtype="float32", device="cpu", max_model_len=16)
    base = random_prompts(2, 256, 9, 9, seed=1)
    engine.prompt_logits(base)
    batch = [base[0] + [7, 8, 9, 10, 11, 12], base[1] + [5]]
    out = engine.prompt_logits(batch, starts=[9, 0])
    assert engine.last_requests[0].cached_tokens >= 8
    for ids, start, got in zip(batch, [9, 0], out):
        torch.testing.assert_close(got, hf_logits(hf, ids)[start:], atol=1e-4, rtol=1e-4)
    from engine import SamplingParams

    gen = engine.generate([base[0]], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    assert gen.finish_reason == "length" and len(gen.token_ids) == 16 - 9
    with pytest.raises(ValueError, match="has 16 tokens; the model's context is 16"):
        engine.generate([list(range(3, 19))], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="max_model_len=17 exceeds"):
        Engine.from_hf(_mistral(sliding_window=None, max_position_embeddings=16), max_model_len=17)
    with pytest.raises(ValueError, match="max_model_len must be an int >= 2"):
        Engine.from_hf(hf, max_model_len=True)


def test_other_unimplemented_config_fields_are_refused() -> None:
    from tiny_models import tiny_llama

    hf = tiny_llama(seed=1)
    hf.config.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        _engine(hf)
