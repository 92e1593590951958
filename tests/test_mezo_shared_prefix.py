"""Shared prompt KV (DESIGN §8): within each branch, 16 examples that share a ≥256-token few-shot
prompt compute it once — tokens_computed ≤ 2·(prefix + Σ suffixes) — and the losses are the same as
with the prefix cache disabled."""
import functools

import pytest
import torch

from mezo import MeZOConfig, MeZOTrainer
from mezo_helpers import classification_examples, long_prefix, make_engine, randomize_lora_b, snapshot, tokenizer

N_EXAMPLES = 16
SINGLE = (" business", " entertainment", " politics", " sport", " tech")
MULTI = (" sports news", " world politics", " business and finance")


def _shared_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = len(first)
    for p in prompts[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, p)) if a != b), min(len(first), len(p))))
    return n


@functools.lru_cache(maxsize=None)
def _run_step(candidates: tuple[str, ...], enable_prefix_cache: bool, device: str):
    """One MeZO step on 16 examples; returns (record, (L+, L−), params after, encoded batch).
    Cached: the tests below only read the results."""
    engine = make_engine(enable_prefix_cache=enable_prefix_cache, device=device)
    trainer = MeZOTrainer(engine, MeZOConfig(eps=1e-2, lr=1e-2, batch_size=N_EXAMPLES, seed=5))
    randomize_lora_b(engine)
    encoded = trainer.encode(classification_examples(long_prefix(tokenizer()), list(candidates), n=N_EXAMPLES))
    seen = []
    original = trainer.launch_losses

    def spy(*args, **kw):
        out = original(*args, **kw)
        seen.append(tuple(float(x) for x in out))
        return out

    trainer.launch_losses = spy
    record = trainer.step(encoded)
    assert len(seen) == 1 and not record["skipped"]
    return record, seen[0], snapshot(engine), encoded


def _bound(encoded):
    prefix = _shared_len([e.prompt for e in encoded])
    suffixes = sum(len(e.prompt) - prefix + sum(len(c) for c in e.candidates) for e in encoded)
    return prefix, suffixes


def test_shared_prefix_computed_once_per_branch_and_exact(device):
    cached, losses, params, encoded = _run_step(SINGLE, enable_prefix_cache=True, device=device)
    prefix, suffixes = _bound(encoded)
    assert len(encoded) == N_EXAMPLES and prefix >= 256
    assert cached["tokens_computed"] <= 2 * (prefix + suffixes)

    uncached, ref_losses, ref_params, _ = _run_step(SINGLE, enable_prefix_cache=False, device=device)
    # without the cache every example recomputes the prefix in both branches: the bound bites
    assert uncached["tokens_computed"] >= 2 * N_EXAMPLES * prefix > 2 * (prefix + suffixes)
    assert losses[0] != losses[1]
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=0)
    assert cached["loss"] == pytest.approx(uncached["loss"], rel=1e-5, abs=0)
    assert cached["seeds"] == uncached["seeds"]
    for k in params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=0, atol=1e-6)


def test_multi_token_candidates_share_the_prompt_and_example_kv(device):
    """Multi-token candidates: the 256-token prompt once per branch, each example's own suffix once,
    then only the candidates' tokens (the prompt request's last row scores every first token) — the
    strict bound holds, and the losses equal those with the cache disabled."""
    cached, losses, params, encoded = _run_step(MULTI, enable_prefix_cache=True, device=device)
    prefix, suffixes = _bound(encoded)
    assert all(len(c) > 1 for e in encoded for c in e.candidates)
    assert cached["tokens_computed"] <= 2 * (prefix + suffixes)
    uncached, ref_losses, ref_params, _ = _run_step(MULTI, enable_prefix_cache=False, device=device)
    assert uncached["tokens_computed"] > 2 * (prefix + suffixes)
    assert losses == pytest.approx(ref_losses, rel=1e-5, abs=0)
    for k in params:
        torch.testing.assert_close(params[k], ref_params[k], rtol=0, atol=1e-6)
