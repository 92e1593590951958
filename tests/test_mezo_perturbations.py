"""Many perturbations in one launch (issue 14): a mixed launch of several perturbation ids × signs
(and σ = 0 rows) gives every row the loss it has alone at explicitly perturbed weights; n-SPSA with
n = 4 in one launch equals four separate perturbations; the one-sided estimator, normalized
perturbations, trajectories and bad input.

Tests taking `kernels` run the torch twin and the Triton kernels (interpreter on CPU). The Triton
path with perturbation ids is built on the kern branch: until it is merged they skip, naming it.
"""
from __future__ import annotations

import math

import pytest
import torch

from engine.forward_batch import PerturbationTable
from mezo import ClassificationExample, MeZOConfig, MeZOTrainer, finetune
from mezo.checkpoint import TrajectoryLog
from mezo.estimators import LaunchPlan, branch_kv_pages, launch_plan, trie_tokens
from mezo.seeds import step_seed
from mezo_fixtures import FEW_SHOT, HEADLINES
from mezo_helpers import (TOPICS, assert_replays, assert_step_refused, classification_examples, make_engine,
                          perturbation_trainer, snapshot)

REL = 1e-5
CANDS = TOPICS
SEEDS = [1001, 2002, 3003, 4004]
EPS = [1e-2, 2e-2, 5e-3, 1.5e-2]


def _examples(n: int = 3) -> list[ClassificationExample]:
    return classification_examples(FEW_SHOT, CANDS, n)


_trainer = perturbation_trainer


def _bound(encoded) -> int:
    """prefix + Σ suffixes: the tokens of one branch's prefix tree."""
    return trie_tokens([e.prompt for e in encoded]) + sum(len(c) for e in encoded for c in e.candidates
                                                          if len(c) > 1)


_REF: dict[str, MeZOTrainer] = {}


def _alone_losses(trainer: MeZOTrainer, encoded, theta, z, scale: float) -> list[float]:
    """Each example's loss run alone, unperturbed, on a torch-kernels engine at θ + scale·z."""
    mode = trainer.config.mode
    if mode not in _REF:  # one torch-kernels reference engine per mode, its trainable tensors set each time
        _REF[mode] = MeZOTrainer(make_engine(kernels="torch"), MeZOConfig(mode=mode))
    ref_trainer = _REF[mode]
    ref = ref_trainer.engine
    ref.set_trainable({k: theta[k] + scale * z[k] for k in theta})
    out = []
    for ex in encoded:
        ref.reset_cache()
        out.append(ref_trainer.evaluate([ex])["loss"])
    return out


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_mixed_launch_rows_equal_explicit_perturbation(mode, kernels):
    """4 ids × ± plus σ = 0 rows (under two ids), over examples sharing a few-shot prompt: one launch
    per prefix depth, and every row's loss is that of the example alone at θ + σ ε_p z_p."""
    trainer = _trainer(mode, kernels)
    engine = trainer.engine
    encoded = trainer.encode(_examples(2))
    branches = tuple((p, s) for p in range(4) for s in (1.0, -1.0)) + ((0, 0.0), (2, 0.0))
    plan = LaunchPlan(PerturbationTable(tuple(SEEDS), tuple(EPS)), branches)
    theta = snapshot(engine)
    passes, tokens = engine.runner.forward_passes, engine.runner.tokens_computed
    try:
        per_branch = trainer.run_plan(encoded, plan)
    finally:
        engine.cache.reset()
    assert engine.runner.forward_passes - passes == 2  # the shared prompt, then every example's suffix
    assert engine.runner.tokens_computed - tokens <= len(branches) * _bound(encoded)
    for (p, sign), groups in zip(branches, per_branch):
        got = trainer.example_losses(encoded, groups).tolist()
        want = _alone_losses(trainer, encoded, theta, trainer.noise(SEEDS[p]), sign * EPS[p])
        assert got == pytest.approx(want, rel=REL, abs=0), (p, sign)


def _separate_nspsa(mode: str, n: int, encoded_examples):
    """The n perturbations of step 0 run one at a time (the pre-issue-14 flow): (g, θ after)."""
    trainer = _trainer(mode, n_spsa=n)
    cfg = trainer.config
    encoded = trainer.encode(encoded_examples)
    seeds = [step_seed(cfg.seed, 0, k) for k in range(n)]
    g, losses = [], []
    for seed in seeds:
        plus, minus = trainer.branch_losses(encoded, seed)
        g.append((plus - minus) / (2 * cfg.eps) / n)
        losses += [float(plus), float(minus)]
    g = torch.stack(g)
    trainer.apply_update(seeds, g, cfg.lr_at(0))
    return losses, g.tolist(), snapshot(trainer.engine)


@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_nspsa_one_launch_equals_separate_perturbations(mode, kernels):
    n = 4
    trainer = _trainer(mode, kernels, n_spsa=n)
    engine = trainer.engine
    encoded = trainer.encode(_examples())
    passes = engine.runner.forward_passes
    record = trainer.step(encoded)
    assert not record["skipped"]
    assert engine.runner.forward_passes - passes == 2  # 2n branches, one launch per prefix depth
    assert record["tokens_computed"] <= 2 * n * _bound(encoded)
    assert len(record["branch_losses"]) == 2 * n and record["coefficients"] == record["projected_grad"]
    losses_sep, g_sep, theta_sep = _separate_nspsa(mode, n, _examples())
    assert record["branch_losses"] == pytest.approx(losses_sep, rel=REL, abs=0)
    # g is a difference quotient of fp32 losses: the one launch rounds its rows' noise products apart
    # from the id-less launch (a few ulps of L), which (L+ − L−)/(2εn) scales up by L/(L+ − L−). So g
    # agrees as far as 1e-5-relative losses determine it (the observed gap is ~10x below this bound).
    eps = trainer.config.eps
    for k in range(n):
        tol = REL * (abs(losses_sep[2 * k]) + abs(losses_sep[2 * k + 1])) / (2 * eps * n)
        assert record["projected_grad"][k] == pytest.approx(g_sep[k], rel=0, abs=tol), k
    after = snapshot(engine)
    for k in after:
        torch.testing.assert_close(after[k], theta_sep[k], rtol=REL, atol=1e-7)


@pytest.mark.parametrize("std_scaling", [False, True])
def test_one_sided_estimate_from_explicit_losses(std_scaling):
    n, eps = 3, 1e-2
    trainer = _trainer("lora", estimator="one_sided", n_spsa=n, eps=eps, one_sided_std_scaling=std_scaling)
    engine = trainer.engine
    encoded = trainer.encode(_examples())
    theta = snapshot(engine)
    passes = engine.runner.forward_passes
    record = trainer.step(encoded)
    assert engine.runner.forward_passes - passes == 2  # n perturbed copies + the unperturbed one, one launch
    assert record["tokens_computed"] <= (n + 1) * _bound(encoded)
    perturbed, base = record["branch_losses"][:n], record["branch_losses"][n]
    assert record["loss"] == base
    # the launch's losses are the explicit ones: θ + εz_k per example alone, and θ itself
    for k, seed in enumerate(record["seeds"]):
        want = _alone_losses(trainer, encoded, theta, trainer.noise(seed), eps)
        assert perturbed[k] == pytest.approx(sum(want) / len(want), rel=REL)
    want_base = _alone_losses(trainer, encoded, theta, trainer.noise(0), 0.0)
    assert base == pytest.approx(sum(want_base) / len(want_base), rel=REL)
    g = [(lk - base) / eps / n for lk in perturbed]
    assert record["projected_grad"] == pytest.approx(g, rel=1e-4)
    sigma = torch.tensor(perturbed, dtype=torch.float64).std(correction=0).item()
    assert sigma > 0
    coeffs = [x / sigma for x in g] if std_scaling else g
    assert record["coefficients"] == pytest.approx(coeffs, rel=1e-4)
    after = snapshot(engine)
    lr = trainer.config.lr
    for name in after:
        z = trainer.noise  # θ ← θ − lr Σ c_k z_k
        want = theta[name] - lr * sum(c * z(s)[name] for c, s in zip(record["coefficients"], record["seeds"]))
        torch.testing.assert_close(after[name], want, rtol=REL, atol=1e-7)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_normalized_perturbations(mode):
    n = 2
    trainer = _trainer(mode, n_spsa=n, normalize_perturbations=True)
    engine, eps = trainer.engine, trainer.config.eps
    encoded = trainer.encode(_examples(2))
    theta = snapshot(engine)
    record = trainer.step(encoded)
    assert not record["skipped"]
    for k, seed in enumerate(record["seeds"]):
        z = trainer.noise(seed)
        norm = math.sqrt(sum(float(v.double().square().sum()) for v in z.values()))
        assert record["norms"][k] == pytest.approx(norm, rel=1e-9)
        # the launch ran at ±ε z_k/‖z_k‖ (checked on the first example, alone)
        for b, sign in enumerate((1.0, -1.0)):
            alone = _alone_losses(trainer, encoded, theta, z, sign * eps / norm)
            assert record["branch_losses"][2 * k + b] == pytest.approx(sum(alone) / len(alone), rel=REL)
        assert record["coefficients"][k] == pytest.approx(record["projected_grad"][k] / norm, rel=1e-6)
    after = snapshot(engine)
    for name in after:
        want = theta[name] - trainer.config.lr * sum(
            c * trainer.noise(s)[name] for c, s in zip(record["coefficients"], record["seeds"]))
        torch.testing.assert_close(after[name], want, rtol=REL, atol=1e-7)


ESTIMATOR_CASES = [dict(estimator="spsa", n_spsa=2), dict(estimator="spsa", n_spsa=2, normalize_perturbations=True),
                   dict(estimator="one_sided", n_spsa=3, one_sided_std_scaling=True)]


@pytest.mark.parametrize("cfg", ESTIMATOR_CASES, ids=["nspsa", "nspsa-normalized", "one-sided-std"])
def test_trajectory_replays_every_estimator(cfg, tmp_path):
    config = MeZOConfig(lr=1e-2, eps=1e-2, steps=3, batch_size=2, checkpoint_every=3, seed=3, **cfg)
    train = [{"prompt": f"Headline: {h}\nTopic:", "candidates": CANDS, "label": i % 5}
             for i, h in enumerate(HEADLINES[:4])]
    finetune(make_engine(), train, None, config, out_dir=tmp_path, progress=False)
    records = TrajectoryLog(tmp_path / "trajectory.jsonl").read()
    assert [r.estimator for r in records] == [cfg["estimator"]] * 3
    assert all(len(r.coefficients) == cfg["n_spsa"] for r in records)
    assert all((r.norms is not None) == cfg.get("normalize_perturbations", False) for r in records)
    if cfg["estimator"] == "one_sided":  # std scaling: the coefficients are not the projected gradients
        assert all(r.coefficients != pytest.approx(r.projected_grad) for r in records)
    assert_replays(tmp_path, records, config)


def test_a_four_perturbation_step_syncs_once():
    from test_host_syncs import SyncCounter

    for cfg in (dict(n_spsa=4), dict(estimator="one_sided", n_spsa=4, one_sided_std_scaling=True)):
        trainer = _trainer("lora", **cfg)
        encoded = trainer.encode(_examples(2))
        with SyncCounter() as counter:
            record = trainer.step(encoded)
        assert not record["skipped"]
        assert counter.total == 1, (cfg, dict(counter.sites))


def test_bad_input():
    with pytest.raises(ValueError, match=r"estimator.*'spsa', 'one_sided'"):
        MeZOConfig(estimator="two_sided")
    with pytest.raises(ValueError, match="one_sided_std_scaling.*n_spsa >= 2"):
        MeZOConfig(estimator="one_sided", n_spsa=1, one_sided_std_scaling=True)
    with pytest.raises(ValueError, match="one_sided_std_scaling"):
        MeZOConfig(estimator="spsa", n_spsa=4, one_sided_std_scaling=True)
    with pytest.raises(ValueError, match="unknown estimator"):
        launch_plan("fzoo", [1, 2], 1e-2)
    with pytest.raises(ValueError, match="as many eps as seeds"):
        PerturbationTable((1, 2), (1e-2,))
    with pytest.raises(ValueError, match=r"perturbation 1: step_seed=-3"):
        PerturbationTable((1, -3), (1e-2, 1e-2))

    engine = make_engine()
    req = engine.new_request(engine.encode("Headline: x\nTopic:"), score_from=1, sign=1.0, perturbation_id=2)
    with pytest.raises(ValueError, match=r"perturbation_id=2 must be an int in \[0, 2\)"):
        engine.run_requests([req], perturbation=PerturbationTable((1, 2), (1e-2, 1e-2)))

    # more perturbations than the KV pool holds at once: refused before anything runs, naming the numbers
    small = make_engine(max_cache_tokens=1024)
    trainer = MeZOTrainer(small, MeZOConfig(n_spsa=8, seed=1))
    encoded = trainer.encode(_examples(2))
    assert_step_refused(trainer, encoded, r"needs \d+ pages of KV \(16 branches x \d+ pages of \d+ tokens.*n_spsa=8"
                                          r".*holds \d+ pages \(1024 tokens\); lower n_spsa")
    trainer.config.n_spsa = 1  # the same batch fits with one perturbation
    assert not trainer.step(encoded)["skipped"]


def test_trie_tokens():
    assert trie_tokens([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3]]) == 5
    assert trie_tokens([[1], [2]]) == 2


def test_branch_kv_pages_counts_whole_pages():
    """The budget counts pages as the pool allocates them: shared prompt only in whole pages, up to
    the scheduler's match limit; each request's last page is a whole page."""
    from types import SimpleNamespace

    def req(ids, score_from=None, total=None):
        return SimpleNamespace(prompt_ids=ids, score_from=score_from, max_total_tokens=lambda: total or len(ids))

    prompt = list(range(1, 11))
    scoring = [req(prompt + [c], score_from=10) for c in (50, 60)]
    # 11 tokens each = 3 pages of 4; they share tokens < score_from - 1 = 9: 2 whole pages. 12 tokens of
    # prefix tree would pass as 3 pages; the pool needs 4
    assert trie_tokens([r.prompt_ids for r in scoring]) == 12
    assert branch_kv_pages(scoring, 4) == 3 + 3 - 2
    assert branch_kv_pages([req(prompt), req(prompt)], 4) == 3 + 3 - 2  # never the last prompt token: 9 // 4
    assert branch_kv_pages([req(prompt[:5], total=7), req([9] + prompt[:5], total=7)], 4) == 4  # nothing shared
    assert branch_kv_pages(scoring, 16) == 2  # a shared partial page is copied, not shared
