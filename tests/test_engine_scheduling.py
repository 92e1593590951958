"""Prefix sharing, preemption under a tiny pool, and scoring (engine issue, acceptance 4 and 5)."""
from __future__ import annotations

import pytest
import torch
from tiny_models import random_prompts, tiny_llama

from engine import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def hf(device):
    model = tiny_llama(seed=7, max_pos=1024)
    model.engine_device = device  # every engine of a test runs on the device under test
    return model


def make_engine(hf, **kw) -> Engine:
    kw.setdefault("max_cache_tokens", 16384)
    return Engine.from_hf(hf, dtype="float32", device=hf.engine_device, **kw)


def check_pool_clean(engine: Engine) -> None:
    """After all requests finish, every page is free or held (once) by the prefix tree."""
    engine.pool.check_invariants()
    assert engine.pool.num_free_pages + engine.cache.num_cached_pages == engine.pool.num_usable_pages


def test_shared_prefix_is_computed_once(hf) -> None:
    prefix = random_prompts(1, 256, 200, 200, seed=1)[0]
    suffixes = random_prompts(32, 256, 10, 30, seed=2)
    prompts = [prefix + s for s in suffixes]
    cached = make_engine(hf)
    outs = cached.generate(prompts, GREEDY, use_tqdm=False)
    plain = make_engine(hf, enable_prefix_cache=False).generate(prompts, GREEDY, use_tqdm=False)
    assert sum(o.cached_tokens for o in outs) >= 31 * 200
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.cached_tokens == 0 for o in plain)
    check_pool_clean(cached)


def test_tiny_pool_preempts_and_matches_unconstrained_run(hf) -> None:
    prompts = random_prompts(64, 256, 5, 24, seed=3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    free = make_engine(hf, page_size=4).generate(prompts, params, use_tqdm=False)
    tight = make_engine(hf, page_size=4, max_cache_tokens=64)  # 16 pages; one request needs up to 10
    outs = tight.generate(prompts, params, use_tqdm=False)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in free]
    assert all(len(o.token_ids) == 16 and o.finish_reason == "length" for o in outs)
    check_pool_clean(tight)


def test_request_longer_than_pool_fails_alone(hf) -> None:
    prompts = random_prompts(6, 256, 5, 12, seed=4)
    prompts.insert(2, list(range(3, 103)))  # 100 tokens: more than the 64-token pool
    engine = make_engine(hf, page_size=4, max_cache_tokens=64)
    with pytest.raises(ValueError, match="pool holds only") as info:
        engine.generate(prompts, GREEDY, use_tqdm=False)
    results = info.value.completions
    assert results[2].finish_reason == "error" and "request 2" in results[2].error
    assert all(r.finish_reason == "length" and len(r.token_ids) == 8 for i, r in enumerate(results) if i != 2)
    check_pool_clean(engine)


def test_sampling_is_reproducible_per_request_seed(hf) -> None:
    prompts = random_prompts(4, 256, 5, 12, seed=5)
    params = SamplingParams(max_tokens=12, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    a = make_engine(hf).generate(prompts, params, use_tqdm=False)
    b = make_engine(hf, page_size=4, max_cache_tokens=48).generate(prompts[::-1], params, use_tqdm=False)
    assert [o.token_ids for o in a] == [o.token_ids for o in b[::-1]]


def test_stop_token_ids_and_max_tokens(hf) -> None:
    prompt = random_prompts(1, 256, 8, 8, seed=6)[0]
    engine = make_engine(hf)
    full = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    stop_at = full.token_ids[3]
    first = full.token_ids.index(stop_at)
    cut = engine.generate([prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True,
                                                   stop_token_ids=[stop_at]))[0]
    assert cut.token_ids == full.token_ids[: first + 1] and cut.finish_reason == "stop"


def test_score_shares_prompt_and_equals_logprob_sum(hf) -> None:
    engine = make_engine(hf, page_size=4)
    prompts = random_prompts(3, 256, 20, 30, seed=8)
    cands = [random_prompts(4, 256, 1, 4, seed=9 + i) for i in range(3)]
    got = engine.score(prompts, cands)
    for p, cs, row in zip(prompts, cands, got):
        for c, value in zip(cs, row):
            with torch.no_grad():
                logits = hf(torch.tensor([p + c])).logits[0].float()
            logp = torch.log_softmax(logits, -1)
            want = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c))
            assert value == pytest.approx(want, abs=1e-4)
    # each prompt is computed once (its last row scores every first candidate token); a candidate
    # computes only its own tokens, reusing the prompt's partly filled last page too: two launches
    stats = engine.cache_stats()
    assert any(len(p) % 4 for p in prompts) and any(len(c) > 1 for cs in cands for c in cs)
    assert stats["tokens_computed"] == sum(len(p) for p in prompts) + sum(len(c) for cs in cands for c in cs if len(c) > 1)
    assert stats["forward_passes"] == 2


def test_partial_match_never_starves_admission() -> None:
    """A partial match pins its (possibly big) cached node until the copy; when that pinning leaves
    too few pages, the request is admitted without the partial match instead of waiting forever."""
    from engine.kv_pool import KVPool
    from engine.radix_cache import RadixCache
    from engine.request import Request
    from engine.scheduler import Scheduler

    pool = KVPool(1, 9, 2, 1, 2, torch.float32, "cpu")  # 8 usable pages of 2 tokens
    cache = RadixCache(pool, 2)
    pages = pool.alloc(5)
    cache.insert("a", list(range(1, 11)), pages)  # one 5-page node
    pool.decref(pages)
    scheduler = Scheduler(pool, cache)
    req = Request(1, [1, 9] + [0] * 12, SamplingParams(max_tokens=1, temperature=0.0), "a")  # 7 pages
    scheduler.add(req)
    batch = scheduler.schedule()
    assert batch is not None and batch.requests == [req] and batch.starts == [0]
    scheduler.finish(req)
    pool.check_invariants()
    cache.check_invariants()


def test_a_stalled_scheduler_raises_instead_of_spinning(hf) -> None:
    engine = make_engine(hf, page_size=4, max_cache_tokens=64)  # 16 pages
    held = random_prompts(1, 256, 40, 40, seed=11)[0]
    engine.generate([held], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    node = engine.cache.match_prefix(engine.namespace, held).node
    engine.cache.lock(node)  # 10 pages nobody may evict: a 40-token prompt can never be admitted
    other = random_prompts(1, 256, 40, 40, seed=12)[0]
    with pytest.raises(RuntimeError, match="stalled"):
        engine.generate([other], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    assert not engine.scheduler.has_work()
    engine.cache.unlock(node)
    assert engine.generate([other], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0].token_ids
