"""Every bad input raises a clear error naming the field, and good requests still complete."""
from __future__ import annotations

import pytest
from tiny_models import tiny_llama

from engine import Engine, SamplingParams

GOOD = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def engine(device):
    return Engine.from_hf(tiny_llama(seed=1, max_pos=64), dtype="float32", device=device, max_cache_tokens=1024)


@pytest.mark.parametrize(
    "prompt, params, exc, words",
    [
        ([], SamplingParams(max_tokens=4), ValueError, "empty"),
        (list(range(3, 70)), SamplingParams(max_tokens=4), ValueError, "context"),
        ([5, 6, 999], SamplingParams(max_tokens=4), ValueError, "999"),
        ([5, -1], SamplingParams(max_tokens=4), ValueError, "-1"),
        ([5, "x"], SamplingParams(max_tokens=4), TypeError, "int"),
        (42, SamplingParams(max_tokens=4), TypeError, "prompt"),
        (GOOD, SamplingParams(max_tokens=0), ValueError, "max_tokens"),
        (GOOD, SamplingParams(max_tokens=-3), ValueError, "max_tokens"),
        (GOOD, SamplingParams(max_tokens=2.5), TypeError, "max_tokens"),
        (GOOD, SamplingParams(temperature=-0.5), ValueError, "temperature"),
        (GOOD, SamplingParams(top_p=0.0), ValueError, "top_p"),
        (GOOD, SamplingParams(top_p=1.5), ValueError, "top_p"),
        (GOOD, SamplingParams(top_k=-1), ValueError, "top_k"),
    ],
)
def test_bad_request_raises_and_good_one_completes(engine, prompt, params, exc, words) -> None:
    good = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with pytest.raises(exc, match=words) as info:
        engine.generate([GOOD, prompt, GOOD], [good, params, good], use_tqdm=False)
    results = info.value.completions
    assert "request 1" in str(info.value)
    assert results[1].finish_reason == "error"
    assert results[0].finish_reason == "length" and len(results[0].token_ids) == 4
    assert results[2].token_ids == results[0].token_ids


def test_errors_return_mode(engine) -> None:
    out = engine.generate([GOOD, []], SamplingParams(max_tokens=2, temperature=0.0), errors="return")
    assert out[0].finish_reason in {"length", "stop"} and out[1].finish_reason == "error"


def test_string_prompt_without_tokenizer(engine) -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        engine.generate(["hello"], SamplingParams(max_tokens=2))


@pytest.mark.parametrize("name", ["no-such-model", "/nonexistent/dir", "weights.gguf"])
def test_unknown_model_raises(name: str) -> None:
    with pytest.raises(ValueError, match="model="):
        Engine(name)


def test_bad_engine_options() -> None:
    with pytest.raises(ValueError, match="page_size"):
        Engine.from_hf(tiny_llama(), page_size=0)
    with pytest.raises(ValueError, match="attention_backend"):
        Engine.from_hf(tiny_llama(), attention_backend="cudnn")
    with pytest.raises(ValueError, match="dtype"):
        Engine.from_hf(tiny_llama(), dtype="int8")
