"""Bad input fails fast and clearly, before any MeZO step or checkpoint; non-finite losses skip the
step (counted) and abort after `max_nonfinite` in a row; checkpoints are complete or absent."""
import json
import math
import os
import re

import pytest
import torch

from mezo import ClassificationExample, LMExample, MeZOConfig, MeZOTrainer, finetune, replay_trajectory
from mezo.checkpoint import TrajectoryLog, latest_checkpoint
from mezo.trainer import NonFiniteLossError
from mezo_helpers import make_engine, snapshot

CANDS = [" business", " entertainment", " politics", " sport", " tech"]
GOOD = [{"prompt": f"Headline: {h}\nTopic:", "candidates": CANDS, "label": i % 5}
        for i, h in enumerate(["Striker scores twice", "Chipmaker unveils processor", "Bank raises rates",
                               "Band announces tour", "Parliament debates budget", "New phone sells out"])]


def _config(**kw):
    kw = {"lr": 1e-2, "eps": 1e-2, "steps": 6, "batch_size": 2, "checkpoint_every": 2, "seed": 1, **kw}
    return MeZOConfig(**kw)


@pytest.fixture
def calls(monkeypatch):
    """Counts MeZO steps and branch runs (class-level: finetune builds its own trainer)."""
    counts = {"step": 0, "launch_losses": 0}
    step, branch = MeZOTrainer.step, MeZOTrainer.launch_losses

    def counting_step(self, *a, **k):
        counts["step"] += 1
        return step(self, *a, **k)

    def counting_branch(self, *a, **k):
        counts["launch_losses"] += 1
        return branch(self, *a, **k)

    monkeypatch.setattr(MeZOTrainer, "step", counting_step)
    monkeypatch.setattr(MeZOTrainer, "launch_losses", counting_branch)
    return counts


def _write_jsonl(path, lines):
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    return path


BAD_ROWS = {
    "malformed": ('{"prompt": "Headline: x\\nTopic:", "candidates": [" a", " b"], "label": 0', r":3: malformed JSON"),
    "missing-candidates": ({"prompt": "Headline: x\nTopic:", "label": 0}, r":3: missing required key 'candidates'"),
    "label-out-of-range": ({**GOOD[0], "label": 5}, r":3: label 5 out of range for 5 candidates"),
    "negative-label": ({**GOOD[0], "label": -1}, r":3: label -1 out of range"),
    "empty-prompt": ({**GOOD[0], "prompt": ""}, r":3: 'prompt' must be a non-empty string"),
    "blank-prompt": ({**GOOD[0], "prompt": "  \n "}, r":3: 'prompt' must be a non-empty string"),
    "one-candidate": ({**GOOD[0], "candidates": [" sport"], "label": 0}, r":3: 'candidates' must be a list of at least 2"),
}


def _assert_nothing_started(out, counts, engine, before):
    assert counts == {"step": 0, "launch_losses": 0}
    assert not (out / "checkpoints").exists() and not (out / "trajectory.jsonl").exists()
    assert not (out / "adapter").exists()
    for k, v in engine.trainable_parameters().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("kind", sorted(BAD_ROWS))
@pytest.mark.parametrize("split", ["train", "eval"])
def test_bad_row_fails_before_training_naming_file_and_line(kind, split, tmp_path, calls):
    bad, message = BAD_ROWS[kind]
    path = _write_jsonl(tmp_path / f"{split}.jsonl", [GOOD[0], GOOD[1], bad, GOOD[2]])
    good = _write_jsonl(tmp_path / "good.jsonl", GOOD)
    engine = make_engine()
    engine.add_lora()
    before = snapshot(engine)
    out = tmp_path / "run"
    train, eval_ = (path, good) if split == "train" else (good, path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + message):
        finetune(engine, train, eval_, _config(), out_dir=out, progress=False)
    _assert_nothing_started(out, calls, engine, before)


def test_invalid_utf8_names_file_and_line(tmp_path, calls):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(GOOD[0]) + "\n").encode() + json.dumps({**GOOD[1], "prompt": "Caf\u00e9\nTopic:"},
                                                                         ensure_ascii=False).encode("latin-1") + b"\n")
    engine = make_engine()
    engine.add_lora()
    before = snapshot(engine)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":2: not valid UTF-8"):
        finetune(engine, path, None, _config(), out_dir=out, progress=False)
    _assert_nothing_started(out, calls, engine, before)


def test_prompt_longer_than_max_length_fails_before_training(tmp_path, calls):
    long_row = {**GOOD[0], "prompt": "Headline: " + "very " * 40 + "long\nTopic:"}
    engine = make_engine()
    engine.add_lora()
    before = snapshot(engine)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"example 2 has \d+ tokens, more than max_length=32"):
        finetune(engine, [GOOD[0], GOOD[1], long_row], None, _config(max_length=32), out_dir=out, progress=False)
    _assert_nothing_started(out, calls, engine, before)
    # the limit counts the longest candidate too: a prompt that fits alone is still rejected
    n_prompt = len(engine.encode(GOOD[0]["prompt"]))
    with pytest.raises(ValueError, match=f"more than max_length={n_prompt}"):
        finetune(engine, [GOOD[0]], None, _config(max_length=n_prompt), out_dir=out, progress=False)
    _assert_nothing_started(out, calls, engine, before)


def test_prompt_longer_than_model_context_fails_before_training(tmp_path, calls):
    """max_length may exceed the model's context (2048 positions here): that limit is checked too."""
    huge = {**GOOD[0], "prompt": "Headline: " + "very " * 2100 + "long\nTopic:"}
    engine = make_engine()
    engine.add_lora()
    before = snapshot(engine)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"example 1 has \d+ tokens, more than the model's context \(2048\)"):
        finetune(engine, [GOOD[0], huge], None, _config(max_length=8192), out_dir=out, progress=False)
    _assert_nothing_started(out, calls, engine, before)


@pytest.mark.parametrize("example,message", [
    (ClassificationExample("", CANDS, 0), "'prompt' must be a non-empty string"),
    (ClassificationExample("Headline: x\nTopic:", CANDS, 7), "label 7 out of range"),
    (ClassificationExample("Headline: x\nTopic:", [], 0), "'candidates' must be a list of at least 2"),
    (LMExample("Headline: x\nTopic:", " sport"), "missing required key 'candidates'"),
], ids=["empty-prompt", "label-out-of-range", "no-candidates", "lm-example-for-classification"])
def test_trainer_step_rejects_bad_examples_before_any_forward(example, message):
    """MeZOTrainer.step takes raw examples too: they get the same checks as finetune's input."""
    engine = make_engine()
    trainer = MeZOTrainer(engine, _config())
    before = snapshot(engine)
    passes = engine.runner.forward_passes
    with pytest.raises(ValueError, match=re.escape(message)):
        trainer.step([ClassificationExample(**GOOD[0]), example])
    assert engine.runner.forward_passes == passes and trainer.step_count == 0
    for k, v in engine.trainable_parameters().items():
        assert torch.equal(v, before[k]), k


def _nan_branches(monkeypatch, bad_steps, value=float("nan")):
    """launch_losses returns non-finite losses at the given (0-based) steps, real ones otherwise."""
    real = MeZOTrainer.launch_losses

    def fake(self, encoded, plan):
        if self.step_count in bad_steps:
            return torch.tensor([value, 1.0])
        return real(self, encoded, plan)

    monkeypatch.setattr(MeZOTrainer, "launch_losses", fake)


def test_nonfinite_step_is_skipped_counted_and_aborts_after_max(monkeypatch):
    engine = make_engine()
    trainer = MeZOTrainer(engine, _config(max_nonfinite=3))
    batch = trainer.encode([ClassificationExample(**r) for r in GOOD[:2]])
    _nan_branches(monkeypatch, {1, 3, 4, 6, 7, 8}, value=float("nan"))
    expect_skipped = [False, True, False, True, True, False, True, True]
    for step, skipped in enumerate(expect_skipped):
        before = snapshot(engine)
        record = trainer.step(batch)
        assert record["step"] == step and record["skipped"] is skipped
        changed = any(not torch.equal(v, before[k]) for k, v in engine.trainable_parameters().items())
        assert changed is not skipped, f"step {step}: a skipped step must leave θ alone, a good one update it"
    assert trainer.nonfinite_steps == 5
    before = snapshot(engine)
    with pytest.raises(NonFiniteLossError, match="3 consecutive non-finite"):
        trainer.step(batch)  # step 8: the third in a row
    assert trainer.nonfinite_steps == 6
    for k, v in engine.trainable_parameters().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_infinite_loss_counts_as_nonfinite(value, monkeypatch):
    engine = make_engine()
    trainer = MeZOTrainer(engine, _config(max_nonfinite=1))
    batch = trainer.encode([ClassificationExample(**GOOD[0])])
    _nan_branches(monkeypatch, {0}, value=value)
    with pytest.raises(NonFiniteLossError):
        trainer.step(batch)


def test_finetune_skips_nonfinite_steps_and_replays(tmp_path, monkeypatch):
    _nan_branches(monkeypatch, {1, 4})
    engine = make_engine()
    result = finetune(engine, GOOD, None, _config(), out_dir=tmp_path, progress=False)
    assert result.steps == 6 and result.nonfinite_steps == 2
    assert [h["skipped"] for h in result.history] == [False, True, False, False, True, False]
    records = TrajectoryLog(tmp_path / "trajectory.jsonl").read()
    assert [r.step for r in records] == list(range(6))
    assert [math.isfinite(r.projected_grad[0]) for r in records] == [True, False, True, True, False, True]
    from safetensors.torch import load_file

    initial = load_file(tmp_path / "checkpoints" / "initial.safetensors")
    replayed = replay_trajectory(make_engine(), initial, records, _config())
    final = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    for k in final:
        torch.testing.assert_close(replayed[k], final[k], rtol=0, atol=1e-6)


def _checkpoint_dirs(ckpt_dir):
    """Every entry is a complete checkpoint (or initial.safetensors): never a partial one."""
    names = sorted(os.listdir(ckpt_dir))
    for name in names:
        if name == "initial.safetensors":
            continue
        assert re.fullmatch(r"ckpt-\d+", name), f"leftover {name}"
        d = ckpt_dir / name
        assert (d / "state.json").is_file() and (d / "trainable.safetensors").is_file(), f"partial {d}"
    return [n for n in names if n.startswith("ckpt-")]


def test_abort_on_nonfinite_leaves_complete_checkpoints(tmp_path, monkeypatch):
    _nan_branches(monkeypatch, {3, 4, 5})
    engine = make_engine()
    with pytest.raises(NonFiniteLossError):
        finetune(engine, GOOD, None, _config(max_nonfinite=3), out_dir=tmp_path, progress=False)
    assert _checkpoint_dirs(tmp_path / "checkpoints") == ["ckpt-2", "ckpt-4"]
    assert not (tmp_path / "adapter").exists()


def test_failed_checkpoint_write_leaves_no_partial_checkpoint_and_resumes(tmp_path, monkeypatch):
    import mezo.checkpoint as ckmod

    real_write = ckmod.atomic_write_json
    writes = {"n": 0}

    def flaky(path, obj):
        writes["n"] += 1
        if writes["n"] == 2:  # the second checkpoint dies after its tensors are written
            raise OSError("disk full")
        return real_write(path, obj)

    monkeypatch.setattr(ckmod, "atomic_write_json", flaky)
    with pytest.raises(OSError, match="disk full"):
        finetune(make_engine(), GOOD, None, _config(), out_dir=tmp_path, progress=False)
    ckpt_dir = tmp_path / "checkpoints"
    assert _checkpoint_dirs(ckpt_dir) == ["ckpt-2"]
    assert latest_checkpoint(ckpt_dir).name == "ckpt-2"

    monkeypatch.setattr(ckmod, "atomic_write_json", real_write)
    result = finetune(make_engine(), GOOD, None, _config(), out_dir=tmp_path, progress=False)
    assert result.resumed_from == 2 and result.steps == 6
    assert _checkpoint_dirs(ckpt_dir) == ["ckpt-4", "ckpt-6"]
    assert [r.step for r in TrajectoryLog(tmp_path / "trajectory.jsonl").read()] == list(range(6))
