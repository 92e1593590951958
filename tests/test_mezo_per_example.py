"""Per-example perturbations (GRZO, estimator="per_example"; issue 14): example i of the batch runs at
θ ± ε z_i under its own seed, both branches in one launch. Every row's loss equals that example run
alone at explicitly perturbed weights; GRZO's coefficients follow from those losses; the update is
p − lr Σ c_i z_i; tokens computed are exactly those of the examples run one by one (no KV shared across
examples); the trajectory replays; bad configs are refused; a step syncs the host once.

Tests taking `kernels` run the torch twin and the Triton kernels (interpreter on CPU).
"""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from mezo import ClassificationExample, MeZOConfig, MeZOTrainer, finetune
from mezo.checkpoint import TrajectoryLog
from mezo.estimators import estimate, launch_plan, trie_tokens
from mezo.seeds import step_seed
from mezo_fixtures import FEW_SHOT, HEADLINES
from mezo_helpers import (TOPICS, assert_replays, assert_step_refused, classification_examples, make_engine,
                          perturbation_trainer, snapshot)

REL = 1e-5
CANDS = TOPICS
FLOOR = 1e-6  # MeZOConfig.one_sided_std_floor's default: GRZO's ϵ


def _examples(n: int = 3, prefix: str = FEW_SHOT) -> list[ClassificationExample]:
    return classification_examples(prefix, CANDS, n)


def _trainer(mode: str, kernels: str = "torch", **cfg) -> MeZOTrainer:
    return perturbation_trainer(mode, kernels, **{"estimator": "per_example", "batch_size": 3, **cfg})


_REF: dict[str, MeZOTrainer] = {}


def _alone(trainer: MeZOTrainer, ex, theta, z, scale: float) -> tuple[float, int]:
    """(loss, tokens computed) of one example run alone, unperturbed, on a torch-kernels engine at θ + scale·z."""
    mode = trainer.config.mode
    if mode not in _REF:
        _REF[mode] = MeZOTrainer(make_engine(kernels="torch"), MeZOConfig(mode=mode))
    ref_trainer = _REF[mode]
    ref = ref_trainer.engine
    ref.set_trainable({k: theta[k] + scale * z[k] for k in theta})
    ref.reset_cache()
    tokens = ref.runner.tokens_computed
    loss = ref_trainer.evaluate([ex])["loss"]
    return loss, ref.runner.tokens_computed - tokens


def _grzo(delta: list[float], eps: float, group_relative: bool = True) -> list[float]:
    """GRZO's coefficients in float64: c_i = δ_i / (s + ϵ) / (2εB), s the population std of δ."""
    b = len(delta)
    s = torch.tensor(delta, dtype=torch.float64).std(correction=0).item() if group_relative else None
    return [d / (s + FLOOR) / (2 * eps * b) if group_relative else d / (2 * eps * b) for d in delta]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_rows_equal_explicit_perturbation_and_grzo_update(mode, kernels):
    trainer = _trainer(mode, kernels)
    engine, cfg = trainer.engine, trainer.config
    # the few-shot prompt in LoRA mode (its prefix sharing is what the estimator gives up); full mode,
    # the slowest in the Triton interpreter, takes the bare headlines (they still share "Headline:")
    encoded = trainer.encode(_examples(prefix=FEW_SHOT if mode == "lora" else ""))
    b, eps = len(encoded), cfg.eps
    theta = snapshot(engine)
    passes = engine.runner.forward_passes
    record = trainer.step(encoded)
    assert not record["skipped"] and record["estimator"] == "per_example"
    assert engine.runner.forward_passes - passes == 1  # nothing shared across examples: one launch
    assert record["seeds"] == [step_seed(cfg.seed, 0, i) for i in range(b)]
    plus, minus = record["branch_losses"][:b], record["branch_losses"][b:]
    assert record["loss"] == pytest.approx(sum(plus + minus) / (2 * b), rel=1e-6)

    # 1. every row is its example alone at θ ± ε z_i, z_i regenerated from its seed
    zs = [trainer.noise(s) for s in record["seeds"]]
    want_plus, want_minus, alone_tokens = [], [], 0
    for i, ex in enumerate(encoded):
        for sign, want in ((1.0, want_plus), (-1.0, want_minus)):
            loss, tokens = _alone(trainer, ex, theta, zs[i], sign * eps)
            want.append(loss)
            alone_tokens += tokens
    assert plus == pytest.approx(want_plus, rel=REL, abs=0)
    assert minus == pytest.approx(want_minus, rel=REL, abs=0)

    # 2. tokens: exactly the examples run one by one in both branches; the few-shot prefix is not shared
    per_example = [trie_tokens([e.prompt]) + sum(len(c) for c in e.candidates if len(c) > 1) for e in encoded]
    assert record["tokens_computed"] == alone_tokens == 2 * sum(per_example)
    shared = trie_tokens([e.prompt for e in encoded])
    assert record["tokens_computed"] > 2 * shared  # what spsa computes for the same batch

    # 3. g_i = δ_i/(2ε); GRZO's coefficients, exactly from the run's own losses...
    delta = [p - m for p, m in zip(plus, minus)]
    assert record["projected_grad"] == pytest.approx([d / (2 * eps) for d in delta], rel=1e-6)
    assert record["coefficients"] == pytest.approx(_grzo(delta, eps), rel=1e-6)
    # ...and within what 1e-5-relative losses determine from the explicit ones: |δ̂_i − δ_i| <= e_i,
    # the population std is ‖·‖/√B of the centred vector, so |ŝ − s| <= e_s = ‖e‖/√B, and
    # |â_i − a_i| <= e_i/(s+ϵ−e_s) + |δ_i| e_s/((s+ϵ)(s+ϵ−e_s)); c = a/(2εB)
    d_ref = [p - m for p, m in zip(want_plus, want_minus)]
    e = [REL * (abs(p) + abs(m)) for p, m in zip(want_plus, want_minus)]
    s = torch.tensor(d_ref, dtype=torch.float64).std(correction=0).item() + FLOOR
    e_s = math.sqrt(sum(x * x for x in e) / b)
    assert s > 10 * e_s  # the bound is meaningful
    c_ref = _grzo(d_ref, eps)
    for i in range(b):
        tol = (e[i] / (s - e_s) + abs(d_ref[i]) * e_s / (s * (s - e_s))) / (2 * eps * b) + 1e-6 * abs(c_ref[i])
        assert record["coefficients"][i] == pytest.approx(c_ref[i], rel=0, abs=tol), i

    # 4. p ← p − lr Σ_i c_i z_i
    after = snapshot(engine)
    for name in after:
        want = theta[name] - cfg.lr * sum(c * z[name] for c, z in zip(record["coefficients"], zs))
        torch.testing.assert_close(after[name], want, rtol=REL, atol=1e-7)


def test_plain_per_example_spsa_and_normalized():
    """group-relative off: c_i = δ_i/(2εB); normalized: the launch runs at ε/‖z_i‖ and c_i is divided by ‖z_i‖."""
    trainer = _trainer("lora", per_example_group_relative=False, normalize_perturbations=True)
    engine, eps = trainer.engine, trainer.config.eps
    encoded = trainer.encode(_examples(2, prefix=""))
    theta = snapshot(engine)
    record = trainer.step(encoded)
    b = len(encoded)
    zs = [trainer.noise(s) for s in record["seeds"]]
    norms = [math.sqrt(sum(float(v.double().square().sum()) for v in z.values())) for z in zs]
    assert record["norms"] == pytest.approx(norms, rel=1e-9)
    for i, ex in enumerate(encoded):
        for row, sign in ((i, 1.0), (b + i, -1.0)):
            assert record["branch_losses"][row] == pytest.approx(
                _alone(trainer, ex, theta, zs[i], sign * eps / norms[i])[0], rel=REL)
    delta = [record["branch_losses"][i] - record["branch_losses"][b + i] for i in range(b)]
    want = [c / n for c, n in zip(_grzo(delta, eps, group_relative=False), norms)]
    assert record["coefficients"] == pytest.approx(want, rel=1e-6)
    after = snapshot(engine)
    for name in after:
        want_p = theta[name] - trainer.config.lr * sum(c * z[name] for c, z in zip(record["coefficients"], zs))
        torch.testing.assert_close(after[name], want_p, rtol=REL, atol=1e-7)


def test_estimate_formula():
    """The estimator on given losses: δ, std over the batch (divisor B), not mean-centred."""
    losses = torch.tensor([[1.0, 2.0, 4.0, 3.0], [0.5, 2.5, 3.0, 3.0]])
    est = estimate("per_example", losses, 4, 0.1, std_floor=1e-6)
    delta = [0.5, -0.5, 1.0, 0.0]
    assert est.projected_grad.tolist() == pytest.approx([d / 0.2 for d in delta], rel=1e-6)
    assert est.coefficients.tolist() == pytest.approx(_grzo(delta, 0.1), rel=1e-6)
    assert float(est.loss) == pytest.approx(float(losses.mean()), rel=1e-7)
    plain = estimate("per_example", losses, 4, 0.1, group_relative=False)
    assert plain.coefficients.tolist() == pytest.approx([d / 0.8 for d in delta], rel=1e-6)
    with pytest.raises(ValueError, match=r"per_example needs \[2, 3\] per-example losses, got \(2, 4\)"):
        estimate("per_example", losses, 3, 0.1)
    plan = launch_plan("per_example", [11, 22, 33], 1e-2)
    assert plan.per_example and plan.table.seeds == (11, 22, 33)
    assert [plan.perturbation_id(b, 2) for b in range(2)] == [2, 2]
    assert plan.namespace(0, 1) != plan.namespace(1, 1) != plan.namespace(1, 2)


def test_equal_differences_keep_a_bounded_step():
    """All δ_i equal (s = 0): GRZO's δ_i/ϵ would be a 1e6-times step; the spread is held at
    GROUP_SPREAD_MIN_FRACTION · rms(δ), so |a_i| <= 1/fraction; an ordinary δ (spread above the bound)
    is untouched (test_estimate_formula), and all-zero δ stays a zero step."""
    from mezo.estimators import GROUP_SPREAD_MIN_FRACTION

    same = torch.tensor([[2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    est = estimate("per_example", same, 4, 0.01, std_floor=1e-6)
    a = 1.0 / (GROUP_SPREAD_MIN_FRACTION * 1.0 + 1e-6)
    assert est.coefficients.tolist() == pytest.approx([a / (2 * 0.01 * 4)] * 4, rel=1e-6)
    assert max(abs(c) for c in est.coefficients.tolist()) < 1e3  # not 2.5e7
    zero = estimate("per_example", torch.ones(2, 4), 4, 0.01)
    assert zero.coefficients.tolist() == [0.0] * 4


def test_trajectory_replays(tmp_path):
    config = MeZOConfig(lr=1e-3, eps=1e-2, steps=3, batch_size=3, checkpoint_every=3, seed=3, estimator="per_example")
    train = [{"prompt": f"Headline: {h}\nTopic:", "candidates": CANDS, "label": i % 5}
             for i, h in enumerate(HEADLINES[:4])]
    finetune(make_engine(), train, None, config, out_dir=tmp_path, progress=False)
    records = TrajectoryLog(tmp_path / "trajectory.jsonl").read()
    assert [r.estimator for r in records] == ["per_example"] * 3
    assert all(len(r.seeds) == len(r.coefficients) == 3 and len(r.branch_losses) == 6 for r in records)
    assert_replays(tmp_path, records, config)


def test_a_step_syncs_once():
    from test_host_syncs import SyncCounter

    trainer = _trainer("lora")
    encoded = trainer.encode(_examples(3, prefix=""))
    with SyncCounter() as counter:
        record = trainer.step(encoded)
    assert not record["skipped"]
    assert counter.total == 1, dict(counter.sites)


def test_bad_config():
    with pytest.raises(ValueError, match=r"MeZOConfig.n_spsa=2: must be 1 with estimator='per_example'"):
        MeZOConfig(estimator="per_example", n_spsa=2)
    with pytest.raises(ValueError, match=r"MeZOConfig.batch_size=1: must be >= 2 .*per_example_group_relative"):
        MeZOConfig(estimator="per_example", batch_size=1)
    MeZOConfig(estimator="per_example", batch_size=1, per_example_group_relative=False)  # plain SPSA: fine
    with pytest.raises(ValueError, match=r"MeZOConfig.batch_size=1025: must be <= 1024"):
        MeZOConfig(estimator="per_example", batch_size=1025)
    with pytest.raises(ValueError, match=r"per_example_group_relative=1: must be True or False"):
        MeZOConfig(estimator="per_example", per_example_group_relative=1)
    with pytest.raises(ValueError, match=r"'spsa', 'one_sided', 'per_example'"):
        MeZOConfig(estimator="grzo")
    # a step handed a batch of another size than the config's: the same limits, before anything runs
    trainer = _trainer("lora")
    with pytest.raises(ValueError, match=r"per_example' needs a batch of 2..1024 examples.*got 1"):
        trainer.step(_examples(1, prefix=""))
    assert trainer.step_count == 0

    from mezo.cli import add_finetune_arguments, build_config

    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    cfg = build_config(parser.parse_args(["--estimator", "per_example", "--no-group-relative"]))
    assert cfg.estimator == "per_example" and cfg.per_example_group_relative is False
    assert build_config(parser.parse_args(["--estimator", "per_example"])).per_example_group_relative is True


def test_kv_budget_counts_no_sharing_across_examples():
    """A few-shot batch that fits as MeZO (prompt shared) but not per example: refused before it runs,
    the message naming the per-example count."""
    from mezo.estimators import branch_kv_pages

    examples = _examples(4)
    small = make_engine(max_cache_tokens=512)
    spsa = MeZOTrainer(small, MeZOConfig(seed=1, batch_size=4))
    encoded = spsa.encode(examples)
    assert not spsa.step(encoded)["skipped"]  # the shared prompt fits
    trainer = MeZOTrainer(small, MeZOConfig(seed=1, batch_size=4, estimator="per_example"))
    plan = launch_plan("per_example", [1, 2, 3, 4], 1e-2)
    per = sum(branch_kv_pages(g, small.pool.page_size) for g in trainer.plan_requests(encoded, plan)[0])
    assert 2 * per > small.pool.num_usable_pages
    assert_step_refused(trainer, encoded, rf"needs {2 * per} pages of KV \(2 branches x {per} pages .*no prefix "
                                          r"shared across examples; estimator='per_example'")
