"""An unseeded request draws its own seed without touching any global RNG (issue 12.3)."""
from __future__ import annotations

import random

import numpy as np
import torch
from tiny_models import tiny_llama

from engine import Engine, SamplingParams


def test_unseeded_sampling_leaves_global_rngs_alone() -> None:
    engine = Engine.from_hf(tiny_llama(seed=2), dtype="float32", device="cpu", max_cache_tokens=1024)
    params = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    def draws() -> tuple[torch.Tensor, float, float]:
        return torch.rand(4), random.random(), float(np.random.rand())

    def reseed() -> None:
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)

    reseed()
    a = draws()
    reseed()
    first = engine.generate([[1, 5, 6, 7]], params)[0].token_ids
    b = draws()
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
    reseed()  # the same global state again: the request still draws a seed of its own
    second = engine.generate([[1, 5, 6, 7]], params)[0].token_ids
    assert first != second
    seeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, seed=9)
    assert engine.generate([[1, 5, 6, 7]], seeded)[0].token_ids == engine.generate([[1, 5, 6, 7]], seeded)[0].token_ids
