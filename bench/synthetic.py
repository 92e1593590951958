"""Synthetic MeZO workloads for machines without SmolLM2's tokenizer or the BBC corpus (the GPU machine).

Token ids written as text ("17 845 77") go through every builder unchanged: `SyntheticTokenizer`
maps such text to ids (BOS prepended like a real tokenizer) and back. The examples mirror the BBC
scenarios' shapes: ~16-token prompts with 5 single-token candidates, the same behind a shared
>= 512-token prompt, and 128 + 128-token LM windows. Throughput does not depend on token values.
"""
from __future__ import annotations

import random

from mezo.data import ClassificationExample, LMExample

PAD, BOS, EOS = 0, 1, 2
FIRST = 3  # first id used for content (after pad/bos/eos)


class SyntheticTokenizer:
    """What the engine and the baselines need of a tokenizer, over ids spelled as decimal text."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [int(t) for t in text.split()]
        return [BOS] + ids if add_special_tokens else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) < FIRST))


def _text(rng: random.Random, n: int, vocab: int) -> str:
    return " ".join(str(rng.randrange(FIRST + 5, vocab)) for _ in range(n))


def examples(scenario_key: str, batch_size: int, shots: int, lm_tokens: tuple[int, int], vocab: int,
             seed: int = 0) -> list[ClassificationExample | LMExample]:
    """The scenario's batch: same shapes as the BBC workloads (a shot is ~40 tokens)."""
    rng = random.Random(seed)
    candidates = [f" {FIRST + i}" for i in range(5)]  # five single-token labels
    if scenario_key in ("cls", "cls_full"):
        return [ClassificationExample(_text(rng, rng.randint(10, 22), vocab), candidates, i % 5)
                for i in range(batch_size)]
    if scenario_key == "cls_16shot":
        prefix = _text(rng, max(512, 40 * shots), vocab) + " "
        return [ClassificationExample(prefix + _text(rng, rng.randint(30, 50), vocab), candidates, i % 5)
                for i in range(batch_size)]
    if scenario_key == "lm_256":
        p, t = lm_tokens
        return [LMExample(_text(rng, p, vocab), " " + _text(rng, t, vocab)) for _ in range(batch_size)]
    raise ValueError(f"unknown scenario {scenario_key!r}")
