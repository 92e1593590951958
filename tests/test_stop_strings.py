"""Stop strings with vLLM's rules, including stop strings that are (or contain) special tokens (issue 12.1)."""
from __future__ import annotations

import pytest
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from engine import Engine, SamplingParams

PROMPT = [1, 40, 41, 42, 43, 44, 45]


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(seed=7)


def _params(**kw) -> SamplingParams:
    """Seeded sampling (a random tiny model's greedy output repeats one token)."""
    return SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True, **kw)


def _generate_ids(hf, params: SamplingParams) -> list[int]:
    """What the tiny model generates from PROMPT (generation does not depend on the tokenizer)."""
    engine = Engine.from_hf(hf, dtype="float32", device="cpu", max_cache_tokens=2048)
    return engine.generate([PROMPT], params)[0].token_ids


@pytest.fixture(scope="module")
def sampled_ids(hf) -> list[int]:
    return _generate_ids(hf, _params())


def _marked(ids: list[int], min_pos: int = 2) -> tuple[int, int]:
    """(position, id) of the first output token at >= min_pos that is not an earlier one nor a prompt
    token nor BOS/EOS/pad, so giving that id a new string changes nothing before it."""
    for k in range(min_pos, len(ids) - 2):
        t = ids[k]
        if t > 2 and t not in PROMPT and t not in ids[:k]:
            return k, t
    raise AssertionError(f"no usable token in {ids}")


def _engine(hf, tok) -> Engine:
    return Engine.from_hf(hf, tok, dtype="float32", device="cpu", max_cache_tokens=2048)


def test_stop_string_that_is_a_special_token_stops_right_after_it(hf, sampled_ids) -> None:
    k, t = _marked(sampled_ids)
    tok = tiny_tokenizer(overrides={t: ("<|im_end|>", True)})
    engine = _engine(hf, tok)
    params = _params(stop=["<|im_end|>"])
    out = engine.generate([PROMPT], params)[0]
    assert out.finish_reason == "stop" and out.stop_reason == "<|im_end|>"
    assert out.token_ids == sampled_ids[: k + 1]  # the ids keep the stop token, as vLLM's do
    assert out.text == tok.decode(sampled_ids[:k], skip_special_tokens=True)
    kept = engine.generate([PROMPT], _params(
                                                    stop=["<|im_end|>"], include_stop_str_in_output=True))[0]
    assert kept.text == out.text + "<|im_end|>" and kept.token_ids == out.token_ids


def test_stop_string_containing_a_special_token(hf, sampled_ids) -> None:
    k, t = _marked(sampled_ids)
    tok = tiny_tokenizer(overrides={t: ("<|im_end|>", True)})
    after = tok.decode([sampled_ids[k + 1]], skip_special_tokens=False)
    stop = "<|im_end|> " + after  # the special token and the word after it, as the shown text spells them
    assert stop in tok.decode(sampled_ids, skip_special_tokens=False)
    out = _engine(hf, tok).generate([PROMPT], _params(
                                                             stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.token_ids == sampled_ids[: k + 2]
    assert out.text.rstrip() == tok.decode(sampled_ids[:k], skip_special_tokens=True)


def test_plain_stop_strings_follow_vllm(hf, sampled_ids) -> None:
    k, t = _marked(sampled_ids)
    tok = tiny_tokenizer(overrides={t: ("<|im_end|>", True)})
    engine = _engine(hf, tok)
    word = tok.decode([sampled_ids[1]])
    out = engine.generate([PROMPT], _params(
                                                   stop=[word]))[0]
    assert out.finish_reason == "stop" and out.token_ids == sampled_ids[:2]
    assert out.text == tok.decode(sampled_ids[:1]) + " "  # cut right before the stop string
    kept = engine.generate([PROMPT], _params(
                                                    stop=[word], include_stop_str_in_output=True))[0]
    assert kept.text == out.text + word
    # a plain string inside a special token's text never matches while special tokens are skipped
    inside = engine.generate([PROMPT], _params(
                                                      stop=["im_end"]))[0]
    assert inside.finish_reason == "length" and inside.token_ids == sampled_ids
    shown = engine.generate([PROMPT], _params(
                                                     stop=["im_end"], skip_special_tokens=False))[0]
    assert shown.finish_reason == "stop" and shown.token_ids == sampled_ids[: k + 1]
    assert shown.text == tok.decode(sampled_ids[:k], skip_special_tokens=False) + " <|"


def test_generation_objective_scores_the_stop_trimmed_text(hf) -> None:
    """accuracy / F1 read what generate returns: a token holding "\\n" plus more text must not count."""
    from mezo import MeZOConfig
    from mezo.data import LMExample
    from mezo.trainer import MeZOTrainer

    prompt = "w40 w41 w42 w43 w44 w45"  # encodes to PROMPT (BOS added by the tokenizer)
    greedy_ids = _generate_ids(hf, SamplingParams(max_tokens=12, temperature=0.0))
    k, t = _marked(greedy_ids, min_pos=1)
    tok = tiny_tokenizer(overrides={t: ("\nzz", False)})
    assert tok.encode(prompt) == PROMPT
    target = tok.decode(greedy_ids[:k])
    engine = _engine(hf, tok)
    out = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, stop=["\n"]))[0]
    assert out.text.rstrip() == target and out.finish_reason == "stop"
    trainer = MeZOTrainer(engine, MeZOConfig(objective="accuracy", max_new_tokens=12, steps=1))
    assert trainer.evaluate([LMExample(prompt, target)])["accuracy"] == 1.0
    loss_plus, loss_minus = trainer.branch_losses([LMExample(prompt, target)], seed=3, eps=0.0)
    assert float(loss_plus) == float(loss_minus) == -1.0


@pytest.mark.slow
def test_smollm2_chat_stops_at_im_end(smollm2) -> None:
    """The issue's input: the turn's end token is the 30th output token; the text stops before it."""
    hf, tok = smollm2
    engine = Engine.from_hf(hf, tok, dtype="float32", device="cpu", max_cache_tokens=4096)
    chat = [{"role": "user", "content": "Say hello in one word."}]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=["<|im_end|>"])
    out = engine.chat([chat], params)[0]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert out.finish_reason == "stop" and out.stop_reason == "<|im_end|>"
    assert len(out.token_ids) == 30 and out.token_ids[29] == end and end not in out.token_ids[:29]
    assert out.text == tok.decode(out.token_ids[:29], skip_special_tokens=True) and "<|im_end|>" not in out.text
