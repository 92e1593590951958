"""Kill a MeZO run (SIGKILL, in a subprocess) and rerun the same command: it resumes from the latest
checkpoint and ends with the adapter of an uninterrupted run; the seed trajectory replays from the
initial weights to the same adapter (DESIGN §11)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mezo import MeZOConfig, replay_trajectory
from mezo.checkpoint import TrajectoryLog
from mezo_helpers import make_engine, tokenizer

WORKER = Path(__file__).with_name("mezo_finetune_worker.py")
STEPS = 10
HEADLINES = ["Striker scores twice in cup final", "Chipmaker unveils faster processor",
             "Bank raises interest rates again", "Band announces reunion tour",
             "Parliament debates budget plan", "New phone sells out in hours",
             "Coach sacked after heavy defeat", "Singer tops the charts"]
TOPICS = [3, 4, 0, 1, 2, 4, 3, 1]
CANDIDATES = [" business", " entertainment", " politics", " sport", " tech"]


def _command(data: Path, out: Path, tok_dir: Path) -> list[str]:
    return [sys.executable, str(WORKER), str(data), str(out), "--steps", str(STEPS), "--tokenizer", str(tok_dir),
            "--step-delay", "0.3"]


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _assert_complete_checkpoints(ckpt_dir: Path) -> list[int]:
    steps = []
    for d in ckpt_dir.glob("ckpt-*"):
        assert (d / "state.json").is_file() and (d / "trainable.safetensors").is_file(), f"partial checkpoint {d}"
        json.loads((d / "state.json").read_text())
        steps.append(int(d.name.split("-")[1]))
    return sorted(steps)


def test_kill_resume_matches_uninterrupted_and_replay(tmp_path):
    data = tmp_path / "task.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Headline: {h}\nTopic:", "candidates": CANDIDATES, "label": t})
                            + "\n" for h, t in zip(HEADLINES, TOPICS)))
    tok_dir = tmp_path / "tokenizer"
    tokenizer().save_pretrained(tok_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed, clean = tmp_path / "killed", tmp_path / "clean"

    # the uninterrupted reference runs alongside the run that gets killed
    ref = subprocess.Popen(_command(data, clean, tok_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    victim = subprocess.Popen(_command(data, killed, tok_dir), env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 150
        while _lines(killed / "trajectory.jsonl") < 5:
            assert victim.poll() is None, f"run ended before it could be killed:\n{victim.stdout.read()}"
            assert time.monotonic() < deadline, "no progress from the training subprocess"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait(30)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL
    done_before = _lines(killed / "trajectory.jsonl")
    assert done_before < STEPS, "killed too late to test resuming"
    saved = _assert_complete_checkpoints(killed / "checkpoints")
    assert saved and max(saved) >= 2
    assert not (killed / "adapter").exists()  # the final adapter is only written at the end

    rerun = subprocess.run(_command(data, killed, tok_dir), env=env, capture_output=True, text=True, timeout=150)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert f"RESUMED_FROM {max(saved)}" in rerun.stdout
    out, _ = ref.communicate(timeout=150)
    assert ref.returncode == 0, out
    assert "RESUMED_FROM None" in out

    # same trajectory and same final adapter as the uninterrupted run
    traj_killed = TrajectoryLog(killed / "trajectory.jsonl").read()
    traj_clean = TrajectoryLog(clean / "trajectory.jsonl").read()
    assert [r.step for r in traj_killed] == list(range(STEPS))
    assert [(r.step, r.seed) for r in traj_killed] == [(r.step, r.seed) for r in traj_clean]
    for a, b in zip(traj_killed, traj_clean):
        assert a.projected_grad == pytest.approx(b.projected_grad, rel=1e-5, abs=1e-6)
    # metrics.jsonl: the redone steps are not logged twice
    metrics = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m["step"] for m in metrics if m.get("kind") == "train") == list(range(STEPS))
    final = _adapter(killed)
    _assert_close(final, _adapter(clean))
    initial = load_file(killed / "checkpoints" / "initial.safetensors")
    assert any(not torch.equal(final[k], initial[k]) for k in final), "training changed nothing"

    # replay: initial weights + (seed, projected gradient) log -> the trained adapter
    state = json.loads((killed / "checkpoints" / f"ckpt-{STEPS}" / "state.json").read_text())
    config = MeZOConfig.from_dict(state["config"])
    replayed = replay_trajectory(make_engine(), initial, traj_killed, config)
    _assert_close(replayed, final)
    _assert_complete_checkpoints(killed / "checkpoints")
