"""A tiny random LLaMA with SmolLM2's tokenizer, for MeZO tests that need text."""
from __future__ import annotations

import functools

from tiny_models import tiny_llama


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    from engine.loader import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model("smollm2-135m"))


def tiny_text_engine(seed: int = 0, **engine_kw):
    """Engine over a 2-layer random model whose vocabulary matches SmolLM2's tokenizer."""
    from engine import Engine

    tok = smollm2_tokenizer()
    hf = tiny_llama(seed=seed, vocab=len(tok), hidden=64, max_pos=2048)
    engine_kw.setdefault("max_cache_tokens", 16384)
    return Engine.from_hf(hf, tok, dtype="float32", device="cpu", **engine_kw), hf, tok


FEW_SHOT = (
    "Classify the topic of each headline as business, entertainment, politics, sport or tech.\n"
    "Headline: Shares rally as oil prices fall\nTopic: business\n"
    "Headline: Film festival opens with premiere\nTopic: entertainment\n"
    "Headline: Minister announces new election date\nTopic: politics\n"
)

HEADLINES = ["Striker scores twice in cup final", "Chipmaker unveils faster processor",
             "Bank raises interest rates again", "Band announces reunion tour",
             "Parliament debates budget plan", "New phone sells out in hours"]
