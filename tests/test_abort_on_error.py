"""An exception in the middle of a call leaves nothing behind (issue 12.7).

Exceptions are injected at each stage (admission, forward, sampling, scoring, the MeZO step and
update); afterwards no request is queued or running, every page is free or held once by the prefix
tree, no node is locked, and the next call gives what a fresh engine gives.
"""
from __future__ import annotations

import pytest
import torch
from tiny_models import random_prompts, tiny_llama
from tiny_tokenizer import tiny_tokenizer

from engine import Engine, SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SHARED = list(range(10, 30))  # a 20-token prefix: the prompts share cached pages
PROMPTS = [SHARED + p for p in random_prompts(6, 256, 3, 9, seed=1)]


@pytest.fixture(scope="module")
def hf():
    return tiny_llama(seed=11)


def _engine(hf, **kw) -> Engine:
    kw.setdefault("max_cache_tokens", 1024)
    return Engine.from_hf(hf, tiny_tokenizer(), dtype="float32", device="cpu", page_size=4, **kw)


def _fail_on(monkeypatch, obj, name: str, call: int, exc: BaseException) -> None:
    """Make obj.name raise `exc` on its `call`-th invocation (1-based); other calls run normally."""
    original = getattr(obj, name)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == call:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)


def assert_clean(engine: Engine) -> None:
    assert not engine.scheduler.waiting and not engine.scheduler.running
    engine.pool.check_invariants()
    engine.cache.check_invariants()
    assert engine.cache.stats()["locked_pages"] == 0
    assert all(root.lock_ref == 0 for root in engine.cache.roots.values())
    assert engine.pool.num_free_pages + engine.cache.num_cached_pages == engine.pool.num_usable_pages
    assert engine.runner.perturbation is None


def assert_usable(engine: Engine, hf) -> None:
    want = [o.token_ids for o in _engine(hf).generate(PROMPTS, GREEDY)]
    before = engine.runner.tokens_computed
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == want
    fresh = _engine(hf)
    fresh.generate(PROMPTS, GREEDY)
    # only this call's requests ran (a cache hit can only lower the count)
    assert engine.runner.tokens_computed - before <= fresh.runner.tokens_computed
    assert_clean(engine)


@pytest.mark.parametrize("exc", [KeyboardInterrupt(), torch.OutOfMemoryError("injected OOM")])
def test_interrupted_forward_releases_every_request(hf, monkeypatch, exc) -> None:
    """The issue's input: the 3rd forward pass of a 6-prompt generate raises."""
    engine = _engine(hf, max_running=2)
    _fail_on(monkeypatch, engine.runner, "forward", 3, exc)
    with pytest.raises(type(exc)):
        engine.generate(PROMPTS, GREEDY)
    assert_clean(engine)
    monkeypatch.undo()
    assert_usable(engine, hf)


@pytest.mark.parametrize("stage", ["alloc", "copy_slots", "match_prefix"])
def test_interrupted_admission_leaves_no_lock_or_page(hf, monkeypatch, stage) -> None:
    """Admission raises after the cached prefix was matched and locked (the second prompt of the
    call, or its copy of a partly matched page)."""
    engine = _engine(hf)
    engine.generate(PROMPTS[:1], GREEDY)  # cache the shared prefix, its partial last page included
    target = engine.cache if stage == "match_prefix" else engine.pool
    _fail_on(monkeypatch, target, stage, 1 if stage == "copy_slots" else 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        engine.generate([SHARED + [40, 41], SHARED[:18] + [50, 51, 52]], GREEDY)
    assert_clean(engine)
    monkeypatch.undo()
    assert_usable(engine, hf)


def test_interrupted_sampling(hf, monkeypatch) -> None:
    import engine.engine as engine_module

    engine = _engine(hf)
    _fail_on(monkeypatch, engine_module, "sample", 2, RuntimeError("injected sampler failure"))
    with pytest.raises(RuntimeError, match="injected sampler"):
        engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True))
    assert_clean(engine)
    monkeypatch.undo()
    assert_usable(engine, hf)


def test_interrupted_scoring(hf, monkeypatch) -> None:
    engine = _engine(hf)
    prompts = ["w10 w11 w12 w13 w14 w15", "w10 w11 w12 w13 w16"]
    cands = [[" w20", " w21 w22 w23"], [" w30 w31", " w32"]]
    want = _engine(hf).score(prompts, cands)
    _fail_on(monkeypatch, engine, "_score_rows", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        engine.score(prompts, cands)
    assert_clean(engine)
    monkeypatch.undo()
    assert engine.score(prompts, cands) == want
    assert_usable(engine, hf)


def _trainer(hf):
    from mezo import MeZOConfig, MeZOTrainer

    engine = _engine(hf)
    return MeZOTrainer(engine, MeZOConfig(mode="lora", lr=1e-2, eps=1e-2, seed=4, steps=2))


def _batch():
    from mezo import ClassificationExample

    return [ClassificationExample("w10 w11 w12 w13 w14 w15", [" w20", " w21 w22"], 0),
            ClassificationExample("w10 w11 w12 w13 w16", [" w20", " w21 w22"], 1)]


@pytest.mark.parametrize("where", ["forward", "scoring"])
def test_interrupted_mezo_step_leaves_no_branch_state(hf, monkeypatch, where) -> None:
    from kernels.noise_cache import noise_cache_bytes

    trainer = _trainer(hf)
    engine = trainer.engine
    want = _trainer(hf).step(_batch())
    if where == "forward":
        _fail_on(monkeypatch, engine.runner, "forward", 2, KeyboardInterrupt())
    else:
        _fail_on(monkeypatch, trainer, "_batch_loss", 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.step(_batch())
    assert_clean(engine)
    assert not engine.cache.roots  # no (step, branch) namespace left behind
    assert noise_cache_bytes() == 0 and trainer.step_count == 0
    monkeypatch.undo()
    got = trainer.step(_batch())  # the same step again, exactly as if nothing had failed
    assert got["projected_grad"] == want["projected_grad"] and got["loss"] == want["loss"]
    assert_clean(engine)


def test_interrupted_update_refuses_to_train_on(hf, monkeypatch) -> None:
    import mezo.trainer as trainer_module
    from kernels.noise_cache import noise_cache_bytes

    trainer = _trainer(hf)
    engine = trainer.engine
    namespace = engine.namespace
    import kernels.zo_update as zo_module

    monkeypatch.setattr(zo_module, "_GROUP_ELEMS", 1)  # each tensor on its own: the interrupt falls between two
    _fail_on(monkeypatch, zo_module, "zo_update_", 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        trainer.step(_batch())
    assert engine.namespace != namespace  # one tensor was updated: no KV of the old weights is reused
    assert noise_cache_bytes() == 0 and trainer.step_count == 0
    assert_clean(engine)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=f"interrupted after 1 of {len(trainer.params)} tensors"):
        trainer.step(_batch())
    assert len(engine.generate(PROMPTS, GREEDY)) == 6  # inference still runs (on the half-updated weights)
    assert_clean(engine)


def test_failed_adapter_load_leaves_the_current_adapter(hf, tmp_path) -> None:
    """A file whose second module does not fit the model: the load raises, and the engine keeps the
    adapter it had (tensors, spec and outputs), not a half-attached one its namespace does not describe."""
    from safetensors.torch import load_file, save_file

    engine = _engine(hf)
    engine.add_lora(r=4, alpha=8, seed=2)
    g = torch.Generator().manual_seed(0)
    engine.set_trainable({k: torch.randn(v.shape, generator=g) * 0.1 for k, v in engine.trainable_parameters().items()})
    before = {k: v.clone() for k, v in engine.trainable_parameters().items()}
    spec, want = engine.lora_spec, [o.token_ids for o in engine.generate(PROMPTS, GREEDY)]
    engine.save_adapter(tmp_path / "bad")
    weights = tmp_path / "bad" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    keys = sorted(k for k in tensors if "lora_A" in k)
    for k in keys[:1]:
        tensors[k] = torch.zeros(4, 7)  # in_features 7: fits no linear of this model
    tensors = {k: (v * 2 if k not in keys[:1] else v) for k, v in tensors.items()}
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="do not fit"):
        engine.load_adapter(tmp_path / "bad")
    after = engine.trainable_parameters()
    assert engine.lora_spec == spec and after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert [o.token_ids for o in engine.generate(PROMPTS, GREEDY)] == want
    assert_clean(engine)
