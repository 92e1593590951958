"""Issue 12 item 9: every file a MeZO run writes is written atomically (temp + fsync + rename; JSONL
logs are fsynced appends whose torn last line is dropped), and a torn file from an older run is
rebuilt (initial weights before any checkpoint) or refused (initial weights of a resumable run)."""
import builtins
import io
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file

from mezo import MeZOConfig, MeZOTrainer
from mezo_helpers import classification_examples, make_engine, snapshot

TRAIN = classification_examples("", [" sport", " tech"], n=3)
EVAL = classification_examples("", [" sport", " tech"], n=2)
CFG = MeZOConfig(steps=3, batch_size=2, checkpoint_every=1, eval_every=3, lr=1e-2, eps=1e-2, seed=5)


def _interrupted_run(out: Path, monkeypatch, stop_at: int = 2) -> None:
    """A run killed (KeyboardInterrupt) when step `stop_at` begins: checkpoints up to it exist."""
    real = MeZOTrainer.step

    def step(self, examples):
        if self.step_count == stop_at:
            raise KeyboardInterrupt
        return real(self, examples)

    monkeypatch.setattr(MeZOTrainer, "step", step)
    with pytest.raises(KeyboardInterrupt):
        make_engine().finetune(TRAIN, EVAL, CFG, out_dir=out, progress=False)
    monkeypatch.setattr(MeZOTrainer, "step", real)


def test_every_run_file_is_written_atomically(tmp_path, monkeypatch):
    out = tmp_path / "run"
    in_place = []
    real_open, real_save_file = builtins.open, safetensors.torch.save_file

    def spy_open(file, mode="r", *args, **kwargs):
        p = Path(str(file)) if isinstance(file, (str, Path)) else None
        if p is not None and out in p.parents and any(c in mode for c in "wx") and not p.name.startswith(".tmp-"):
            in_place.append(p.name)  # opened for a truncating write under its final name
        return real_open(file, mode, *args, **kwargs)

    def spy_save_file(tensors, filename, *args, **kwargs):
        in_place.append(Path(filename).name)
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(io, "open", spy_open)
    monkeypatch.setattr(safetensors.torch, "save_file", spy_save_file)
    _interrupted_run(out, monkeypatch)
    make_engine().finetune(TRAIN, EVAL, CFG, out_dir=out, progress=False)  # resumes, rewrites the logs
    assert in_place == []
    written = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "training.png",
            "trajectory.jsonl", "checkpoints/initial.safetensors"} <= written
    assert not [w for w in written if ".tmp-" in w]


def test_torn_initial_weights_from_an_older_run_are_rebuilt(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "initial.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")  # torn
    make_engine().finetune(TRAIN, None, CFG, out_dir=out, progress=False)
    initial = load_file(out / "checkpoints" / "initial.safetensors")
    fresh = make_engine()
    MeZOTrainer(fresh, CFG)
    want = snapshot(fresh)
    assert set(initial) == set(want) and all(torch.equal(initial[k], want[k]) for k in want)


@pytest.mark.parametrize("damage", ["torn", "missing", "replaced"])
def test_resume_refuses_damaged_initial_weights(damage, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_run(out, monkeypatch)
    initial = out / "checkpoints" / "initial.safetensors"
    if damage == "torn":
        initial.write_bytes(initial.read_bytes()[:-7])
    elif damage == "missing":
        initial.unlink()
    else:
        tensors = load_file(initial)
        safetensors.torch.save_file({k: v + 1 for k, v in tensors.items()}, str(initial))
    with pytest.raises(ValueError, match="initial.safetensors"):
        make_engine().finetune(TRAIN, EVAL, CFG, out_dir=out, progress=False)


def test_torn_metrics_and_trajectory_lines_are_dropped_on_resume(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_run(out, monkeypatch)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')  # a kill mid-append
    with open(out / "trajectory.jsonl", "a") as fh:
        fh.write('{"step": 2, "se')
    result = make_engine().finetune(TRAIN, EVAL, CFG, out_dir=out, progress=False)
    assert result.resumed_from == 2 and result.steps == 3
    lines = (out / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole JSON
    assert [r["step"] for r in records if r["kind"] == "train"] == [0, 1, 2]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 3]
    traj = [json.loads(line) for line in (out / "trajectory.jsonl").read_text().splitlines()]
    assert [r["step"] for r in traj] == [0, 1, 2]


def test_unreadable_checkpoint_is_a_clear_error(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _interrupted_run(out, monkeypatch)
    (out / "checkpoints" / "ckpt-2" / "state.json").write_text('{"step": 2, "traj')
    with pytest.raises(ValueError, match="ckpt-2: unreadable checkpoint"):
        make_engine().finetune(TRAIN, EVAL, CFG, out_dir=out, progress=False)


def test_resume_takes_a_changed_shard_balance_but_refuses_other_changes(tmp_path, monkeypatch):
    """shard_balance only decides which rank computes an example, so a run may resume with the other
    split (e.g. switching to "throughput" when a core turns busy); a changed lr is refused, named."""
    from dataclasses import replace

    out = tmp_path / "run"
    _interrupted_run(out, monkeypatch)
    with pytest.raises(ValueError, match=r"differs in \['lr'\]"):
        make_engine().finetune(TRAIN, EVAL, replace(CFG, lr=2e-2), out_dir=out, progress=False)
    result = make_engine().finetune(TRAIN, EVAL, replace(CFG, shard_balance="throughput"), out_dir=out, progress=False)
    assert result.resumed_from == 2 and result.steps == 3
