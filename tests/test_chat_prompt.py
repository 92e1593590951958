"""Chat prompts are the chat template's own token ids: no second BOS (issue 12.2)."""
from __future__ import annotations

import pytest
from tiny_models import tiny_llama
from tiny_tokenizer import tiny_tokenizer

from engine import Engine, SamplingParams

# the Llama-3 / Mistral layout: the template writes BOS itself, and the tokenizer's post-processor adds one
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|im_start|> {{ m['content'] }} <|im_end|> {% endfor %}"
            "{% if add_generation_prompt %}<|im_start|> {% endif %}")
SPECIALS = {3: ("<|im_start|>", True), 4: ("<|im_end|>", True)}
CHAT = [{"role": "system", "content": "w10 w11 w12"}, {"role": "user", "content": "w20 w21 w22 w23 w24 w25"},
        {"role": "assistant", "content": "w30"}, {"role": "user", "content": "w40 w41"}]


@pytest.fixture(scope="module")
def setup():
    tok = tiny_tokenizer(overrides=SPECIALS, add_bos=True, chat_template=TEMPLATE)
    engine = Engine.from_hf(tiny_llama(seed=3), tok, dtype="float32", device="cpu", max_cache_tokens=2048)
    return engine, tok


def _template_ids(tok, chat) -> list[int]:
    ids = tok.apply_chat_template(chat, tokenize=True, add_generation_prompt=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_chat_prompt_is_the_templates_token_ids(setup) -> None:
    engine, tok = setup
    want = _template_ids(tok, CHAT)
    assert want[0] == 1 and want.count(1) == 1 and len(want) == 22  # one BOS (23 tokens re-encoding the text)
    assert engine.chat_ids(CHAT) == want
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    out = engine.chat([CHAT], params)[0]
    assert out.prompt_tokens == len(want)
    assert out.token_ids == engine.generate([want], params)[0].token_ids
    single = engine.chat(CHAT, params)  # one conversation (a list of messages) is accepted, as in vLLM
    assert len(single) == 1 and single[0].token_ids == out.token_ids


def test_cli_chat_uses_the_template_ids(setup, monkeypatch, capsys) -> None:
    from engine import cli

    engine, tok = setup
    seen = []
    monkeypatch.setattr("engine.engine.Engine", lambda *a, **k: engine)  # the CLI builds no other model
    monkeypatch.setattr(engine, "generate", lambda inputs, params, **kw: seen.extend(inputs) or [])
    assert cli.main(["generate", "--chat", "--max-tokens", "2", "w50 w51"]) == 0
    assert seen == [_template_ids(tok, [{"role": "user", "content": "w50 w51"}])]


def test_chat_without_template_is_refused() -> None:
    engine = Engine.from_hf(tiny_llama(seed=3), tiny_tokenizer(), dtype="float32", device="cpu",
                            max_cache_tokens=256)
    with pytest.raises(ValueError, match="chat_template"):
        engine.chat([CHAT])
