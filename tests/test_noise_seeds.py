"""Issue 12 item 6: every (run seed, step, SPSA sample, tensor) of a run has its own noise stream
for any step < 2^32; old (31-bit, version 0) trajectories replay exactly, old checkpoints are refused."""
import json
import random

import pytest
import torch

from kernels.noise import derive_seed, derive_seed_v0, mix63, randn, randn_triton
from kernels.zo_update import zo_update_ref_
from mezo import MeZOConfig, replay_trajectory
from mezo.checkpoint import TrainingCheckpoint, TrajectoryLog
from mezo.seeds import split_step_seed, step_seed, step_seed_v0
from mezo_helpers import classification_examples, make_engine, snapshot

_M63 = (1 << 63) - 1


def _unmix63(y: int) -> int:
    """Inverse of kernels.noise.mix63, step by step (proves it is a bijection of [0, 2^63))."""
    def unxorshift(x: int, s: int) -> int:
        out = x
        for _ in range(63 // s + 1):
            out = x ^ (out >> s)
        return out

    from kernels import noise
    x = unxorshift(y, 32)
    x = (x * pow(noise._MIX_B, -1, 1 << 63)) & _M63
    x = unxorshift(x, 29)
    x = (x * pow(noise._MIX_A, -1, 1 << 63)) & _M63
    return unxorshift(x, 31)


def test_step_seeds_of_a_million_steps_are_distinct():
    seeds = {step_seed(0, s) for s in range(10**6)}
    assert len(seeds) == 10**6
    # the old 31-bit derivation collided (the fault): 3 repeated step seeds among the first 10^5 steps
    old = [step_seed_v0(0, s) for s in range(10**5)]
    assert len(old) - len(set(old)) == 3


def test_step_sample_tensor_grid_is_distinct_including_steps_near_2_pow_32():
    steps = list(range(300)) + [2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]
    keys = {derive_seed(step_seed(12345, s, k), i) for s in steps for k in range(4) for i in range(150)}
    assert len(keys) == len(steps) * 4 * 150
    assert all(0 <= key < 2**63 for key in keys)  # int64 for Triton, never uint64


def test_the_map_is_a_bijection_for_a_fixed_run():
    rng = random.Random(0)
    for _ in range(2000):
        x = rng.randrange(1 << 63)
        assert _unmix63(mix63(x)) == x
    for run in (0, 1, 2**62 + 7):
        for _ in range(200):
            step, k, i = rng.randrange(1 << 32), rng.randrange(1 << 10), rng.randrange(1 << 21)
            s = step_seed(run, step, k)
            assert split_step_seed(run, s) == (step, k)
            # the tensor key decodes back to the three disjoint bit fields
            packed = _unmix63(derive_seed(s, i)) ^ (step_seed(run, 0, 0))
            assert packed == (i << 42) | (k << 32) | step


def test_small_user_seeds_do_not_collide_either():
    """Engine users pass their own perturbation seeds (e.g. 3 and 5): any seeds < 2^42 stay distinct."""
    keys = {derive_seed(s, i) for s in list(range(200)) + [2**42 - 1] for i in range(100)}
    assert len(keys) == 201 * 100


def test_different_runs_get_different_noise():
    assert step_seed(0, 5) != step_seed(1, 5)
    assert derive_seed(step_seed(0, 5), 0) != derive_seed(step_seed(1, 5), 0)


@pytest.mark.parametrize("kwargs,field", [(dict(step=2**32), "step"), (dict(step=-1), "step"), (dict(k=1024), "k"),
                                          (dict(run_seed=-1), "run_seed"), (dict(run_seed=2**63), "run_seed"),
                                          (dict(step=True), "step")])
def test_step_seed_rejects_out_of_range(kwargs, field):
    args = dict(run_seed=0, step=0, k=0) | kwargs
    with pytest.raises(ValueError, match=field):
        step_seed(**args)


def test_derive_seed_rejects_out_of_range():
    for s, i in ((-1, 0), (2**63, 0), (0, -1), (0, 2**21), (1.5, 0)):
        with pytest.raises(ValueError):
            derive_seed(s, i)


def test_config_limits_steps_and_samples():
    MeZOConfig(steps=2**32, n_spsa=1024)
    with pytest.raises(ValueError, match="steps"):
        MeZOConfig(steps=2**32 + 1)
    with pytest.raises(ValueError, match="n_spsa"):
        MeZOConfig(n_spsa=1025)


def test_64_bit_seeds_match_triton():
    """Derived seeds use the Philox key's high word: the torch twin must still equal tl.randn."""
    seeds = [derive_seed(step_seed(0, s, k), i) for s, k, i in ((0, 0, 0), (2**32 - 1, 3, 7), (99, 0, 2**21 - 1))]
    assert all(s >= 2**32 for s in seeds)
    for seed in seeds:
        torch.testing.assert_close(randn(seed, 257, offset=3), randn_triton(seed, 257, offset=3, device="cpu"),
                                   atol=1e-6, rtol=1e-6)


def test_legacy_derivation_is_the_old_function():
    # values of kernels.noise.derive_seed before issue 12 (commit 9f55a99)
    assert [derive_seed_v0(s, i) for s, i in ((0, 0), (0, 1), (7, 3), (2**40 + 9, 5))] == \
        [455555280, 1509732447, 1911482982, 1959914818]


def test_trainer_records_its_sample_seeds():
    engine = make_engine()
    from mezo import MeZOTrainer
    trainer = MeZOTrainer(engine, MeZOConfig(n_spsa=2, seed=9, lr=1e-3))
    trainer.step_count = 2**32 - 1  # the last step the seeds can name
    rec = trainer.step(classification_examples("", [" sport", " tech"], n=2))
    assert rec["seeds"] == [step_seed(9, 2**32 - 1, 0), step_seed(9, 2**32 - 1, 1)]


def test_version_0_trajectory_replays_exactly(tmp_path):
    """A trajectory written before noise versions existed (no `seeds`/`noise_version`) replays with
    the 31-bit derivation it was recorded with."""
    engine = make_engine()
    cfg = MeZOConfig(lr=1e-2, seed=4)
    from mezo import MeZOTrainer
    MeZOTrainer(engine, cfg)
    initial = snapshot(engine)
    lines = [{"step": 0, "seed": derive_seed_v0(4, 0), "projected_grad": 0.7, "lr": 1e-2, "loss": 1.0},
             {"step": 1, "seed": derive_seed_v0(4, 1), "projected_grad": [0.2, -0.5], "lr": 1e-2, "loss": 1.0}]
    path = tmp_path / "trajectory.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = TrajectoryLog(path).read()
    assert [r.noise_version for r in records] == [0, 0]
    replayed = replay_trajectory(engine, initial, records, cfg)

    expected = {k: v.clone() for k, v in initial.items()}
    for line in lines:
        grads = line["projected_grad"] if isinstance(line["projected_grad"], list) else [line["projected_grad"]]
        for index, t in enumerate(expected.values()):
            seeds = [derive_seed_v0(derive_seed_v0(line["seed"], k), index) for k in range(len(grads))]
            zo_update_ref_(t, seeds, grads, line["lr"])
    for k in expected:
        assert torch.equal(replayed[k], expected[k]), k
    assert any(not torch.equal(replayed[k], initial[k]) for k in initial)


def test_version_0_checkpoint_is_refused_on_resume(tmp_path):
    engine = make_engine()
    cfg = MeZOConfig(steps=2, batch_size=2, lr=1e-3)
    from mezo import MeZOTrainer
    MeZOTrainer(engine, cfg)
    ckpt = TrainingCheckpoint(1, snapshot(engine), cfg.to_dict(), 1, noise_version=0)
    path = ckpt.save(tmp_path / "out" / "checkpoints")
    state = json.loads((path / "state.json").read_text())  # as format 1 wrote it: no version field
    del state["noise_version"]
    state["format"] = 1
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="noise version 0"):
        engine.finetune(classification_examples("", [" sport", " tech"], n=2), config=cfg,
                        out_dir=tmp_path / "out", progress=False)


def test_engine_refuses_a_perturbation_seed_outside_int64_before_running():
    engine = make_engine()
    for seed in (-1, 2**63, 1.0):
        with pytest.raises(ValueError, match="step_seed"):
            engine.run_requests([], perturbation=(seed, 1e-2))
    with pytest.raises(ValueError, match="eps"):
        engine.run_requests([], perturbation=(3, float("nan")))
