"""The MeZO training loop: batches, evaluation, checkpoints, resume, trajectory, metrics, plot."""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from engine import Engine
from kernels.noise import derive_seed_v0

from .checkpoint import (TrainingCheckpoint, TrajectoryLog, TrajectoryRecord, append_jsonl, atomic_save_safetensors,
                         atomic_write_bytes, latest_checkpoint)
from .config import RESUME_FREE_FIELDS, MeZOConfig
from .data import load_examples
from .distributed import DistributedMeZOTrainer, make_trainer, resume_on_writer
from .seeds import NOISE_VERSION, tensor_seed_fn
from .trainer import MeZOTrainer, sample_batch

KEEP_CHECKPOINTS = 2
INITIAL = "initial.safetensors"  # the trainable tensors a run starts from (replay needs them)


@dataclass
class TrainResult:
    """What `Engine.finetune` returns: the per-step history and the evaluations."""

    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    initial_eval: dict[str, Any] | None = None
    final_eval: dict[str, Any] | None = None
    steps: int = 0
    seconds: float = 0.0
    nonfinite_steps: int = 0
    resumed_from: int | None = None
    out_dir: str | None = None

    @property
    def steps_per_second(self) -> float:
        done = len(self.history)
        return done / self.seconds if self.seconds > 0 else 0.0


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop metric lines of steps that will be redone (and a torn or corrupt line), by an
    atomic rewrite: a kill during it leaves the old file."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8", errors="replace").split("\n"):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("step", -1) < last_step or rec.get("kind") == "eval" and rec.get("step", -1) <= last_step:
            keep.append(line)
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


_SHA_MEMO: dict[tuple[str, int, int, int], str] = {}


def _file_sha256(path: Path, memo: bool = False) -> str:
    """sha256 of a file. ``memo``: reuse the digest of a file this process already hashed and has not
    seen change (path, inode, mtime, size): checkpoints re-record the hash of a large initial file.
    Resume always re-reads the file."""
    st = path.stat()
    key = (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)
    if memo and key in _SHA_MEMO:
        return _SHA_MEMO[key]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    _SHA_MEMO[key] = h.hexdigest()
    return _SHA_MEMO[key]


def finetune(engine: Engine, train: Any, eval: Any = None, config: MeZOConfig | None = None,
             out_dir: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Run MeZO on `train` (examples, JSONL path, "bbc_news" or a dataset); evaluate on `eval`.

    With `out_dir` (or `config.checkpoint_dir`), checkpoints are written every
    `checkpoint_every` steps and a rerun of the same call resumes from the latest one.
    Inside a torch.distributed process group the run is data-parallel (mezo/distributed.py): every
    rank makes this call with the same arguments, and rank 0 alone writes files and shows progress.
    """
    config = config or MeZOConfig()
    train_ex = load_examples(train, config.objective, split="train")
    eval_ex = load_examples(eval, config.objective, split="test", limit=config.eval_size) if eval is not None else []
    if not train_ex:
        raise ValueError("train has no examples")
    trainer = make_trainer(engine, config)
    distributed = isinstance(trainer, DistributedMeZOTrainer)
    writer = not distributed or trainer.ctx.is_writer
    progress = progress and writer
    enc_train = trainer.encode(train_ex)  # every length check happens before the first step
    enc_eval = trainer.encode(eval_ex) if eval_ex else []
    out = Path(out_dir) if out_dir is not None else None
    ckpt_dir = Path(config.checkpoint_dir) if config.checkpoint_dir else (out / "checkpoints" if out else None)
    result = TrainResult(out_dir=str(out) if out else None)
    trajectory = metrics_path = None
    if out is not None and writer:
        out.mkdir(parents=True, exist_ok=True)
        trajectory = TrajectoryLog(out / "trajectory.jsonl")
        metrics_path = out / "metrics.jsonl"
    if ckpt_dir is not None:
        resume = lambda: _resume_or_start(engine, trainer, config, ckpt_dir, trajectory, metrics_path, result)  # noqa: E731
        if distributed:
            resume_on_writer(trainer, resume, result)
        else:
            resume()
    if enc_eval and result.initial_eval is None:
        result.initial_eval = trainer.evaluate(enc_eval)
        _log_eval(result, metrics_path, trainer.step_count, result.initial_eval, progress)
    last_saved = trainer.step_count

    start_time = time.perf_counter()
    bar = tqdm(total=config.steps, initial=trainer.step_count, desc="MeZO", unit="step", disable=not progress)
    try:
        while trainer.step_count < config.steps:
            step = trainer.step_count
            batch = [enc_train[i] for i in sample_batch(len(enc_train), config.batch_size, config.seed, step)]
            record = trainer.step(batch)
            record["time"] = time.perf_counter() - start_time
            result.history.append(record)
            if trajectory is not None:
                trajectory.append(TrajectoryRecord(step=step, seed=record["seeds"][0],
                                                   projected_grad=record["projected_grad"], lr=record["lr"],
                                                   loss=record["loss"], seeds=list(record["seeds"]),
                                                   noise_version=NOISE_VERSION, skipped=record["skipped"],
                                                   coefficients=record["coefficients"],
                                                   estimator=record["estimator"],
                                                   branch_losses=record["branch_losses"], norms=record["norms"]))
            if metrics_path is not None:
                append_jsonl(metrics_path, {"kind": "train", **record})
            elapsed = time.perf_counter() - start_time
            bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.1e}",
                            steps_per_s=f"{len(result.history) / elapsed:.2f}")
            bar.update(1)
            done = trainer.step_count
            if enc_eval and config.eval_every and done % config.eval_every == 0 and done < config.steps:
                _log_eval(result, metrics_path, done, trainer.evaluate(enc_eval), progress)
            if ckpt_dir is not None and config.checkpoint_every and done % config.checkpoint_every == 0:
                _save_checkpoint(trainer, config, ckpt_dir, trajectory, result, writer)
                last_saved = done
    finally:
        bar.close()
    result.seconds = time.perf_counter() - start_time
    result.steps = trainer.step_count
    result.nonfinite_steps = trainer.nonfinite_steps
    if enc_eval:
        result.final_eval = trainer.evaluate(enc_eval)
        _log_eval(result, metrics_path, trainer.step_count, result.final_eval, progress)
    if ckpt_dir is not None and last_saved != trainer.step_count:
        _save_checkpoint(trainer, config, ckpt_dir, trajectory, result, writer)
    if out is not None and writer:
        if engine.lora_spec is not None:
            engine.save_adapter(out / "adapter")
        from .optional import MissingOptionalDependency
        from .plot import plot_training

        try:
            plot_training(out / "metrics.jsonl", out / "training.png")
        except MissingOptionalDependency as exc:  # training and its files are done; only the picture is missing
            warnings.warn(f"training.png not written: {exc}", stacklevel=2)
    return result


def _log_eval(result: TrainResult, metrics_path: Path | None, step: int, metrics: dict[str, Any],
              progress: bool) -> None:
    record = {"kind": "eval", "step": step, **metrics}
    result.evals.append(record)
    if metrics_path is not None:
        append_jsonl(metrics_path, record)
    if progress:
        shown = ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        tqdm.write(f"eval @ step {step}: {shown}")


def _save_checkpoint(trainer: MeZOTrainer, config: MeZOConfig, ckpt_dir: Path, trajectory: TrajectoryLog | None,
                     result: TrainResult, writer: bool = True) -> None:
    if isinstance(trainer, DistributedMeZOTrainer):
        trainer.check_consistency()  # every rank, before anything is written
    if not writer:
        return
    tensors = {k: v.detach().cpu().clone() for k, v in trainer.params.items()}
    extra = {"initial_eval": result.initial_eval, "nonfinite_steps": trainer.nonfinite_steps,
             "initial_sha256": _file_sha256(ckpt_dir / INITIAL, memo=True)}
    n_traj = len(trajectory.read()) if trajectory is not None else trainer.step_count
    TrainingCheckpoint(trainer.step_count, tensors, config.to_dict(), n_traj, extra).save(ckpt_dir)
    ckpts = sorted((p for p in ckpt_dir.glob("ckpt-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in ckpts[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)


def _resume_or_start(engine: Engine, trainer: MeZOTrainer, config: MeZOConfig, ckpt_dir: Path,
                     trajectory: TrajectoryLog | None, metrics_path: Path | None, result: TrainResult) -> None:
    """Load the latest checkpoint if there is one; otherwise (re)write the initial weights (for replay).

    A fresh start always rewrites ``initial.safetensors`` (atomically), so a file torn by an older
    run is rebuilt; a resume checks it against the hash its checkpoint recorded and refuses a
    missing or different one (replay would start from the wrong weights)."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    initial = ckpt_dir / INITIAL
    latest = latest_checkpoint(ckpt_dir)
    if latest is None:
        atomic_save_safetensors(initial, {k: v.detach().cpu().contiguous() for k, v in trainer.params.items()})
        if trajectory is not None:
            trajectory.truncate(0)
        if metrics_path is not None and metrics_path.exists():
            metrics_path.unlink()
        return
    ckpt = TrainingCheckpoint.load(latest)
    if ckpt.noise_version != NOISE_VERSION:
        raise ValueError(
            f"{latest}: checkpoint uses noise version {ckpt.noise_version} (this mezo uses {NOISE_VERSION}: "
            "64-bit seeds; version 0's 31-bit seeds collide); resuming would mix two noise derivations in one "
            "run. Start a new checkpoint_dir; the old run's trajectory still replays with replay_trajectory")
    saved, now = ({k: v for k, v in c.to_dict().items() if k not in RESUME_FREE_FIELDS}
                  for c in (MeZOConfig.from_dict(ckpt.config), config))
    if saved != now:
        changed = [k for k, v in now.items() if saved.get(k) != v]
        raise ValueError(f"{latest}: checkpoint was made with a different config (differs in {changed}); "
                         f"use another checkpoint_dir or the same settings")
    want = ckpt.extra.get("initial_sha256")
    if not initial.is_file() or want is None or _file_sha256(initial) != want:
        state = "missing" if not initial.is_file() else "not the file this run started from (torn or replaced)"
        raise ValueError(f"{initial} is {state}: the run's trajectory could not be replayed. Restore it, or start "
                         "over with a new checkpoint_dir")
    engine.set_trainable(ckpt.tensors)
    trainer.step_count = ckpt.step
    trainer.nonfinite_steps = int(ckpt.extra.get("nonfinite_steps", 0))
    result.initial_eval = ckpt.extra.get("initial_eval")
    result.resumed_from = ckpt.step
    if trajectory is not None:
        trajectory.truncate(ckpt.trajectory_len)
    if metrics_path is not None:
        _truncate_metrics(metrics_path, ckpt.step)  # also drops a torn last line


def replay_trajectory(engine: Engine, initial: dict[str, torch.Tensor], records: list[TrajectoryRecord],
                      config: MeZOConfig) -> dict[str, torch.Tensor]:
    """Rebuild the trained tensors from the initial ones and the (seed, update coefficient) log.

    The coefficients are what the run gave `apply_update` (recorded since issue 14 for every
    estimator: spsa, one_sided with or without std scaling, normalized perturbations); older records
    carry only the projected gradients, which were their coefficients.

    Each record is replayed with the noise derivation it was recorded with (``noise_version``;
    version 0 logs, written before issue 12, replay exactly). ValueError for a record whose seeds
    do not match its gradients or whose version is unknown.
    """
    trainer = MeZOTrainer(engine, config)
    engine.set_trainable(initial)
    for rec in records:
        grads = rec.projected_grad if isinstance(rec.projected_grad, list) else [rec.projected_grad]
        if rec.coefficients is not None:  # issue 14 logs: the update's coefficients, whatever the estimator
            grads = list(rec.coefficients)
        if rec.skipped or not all(math.isfinite(g) for g in grads):
            continue  # the run skipped this step (older logs: only a non-finite gradient says so)
        tensor_seed = tensor_seed_fn(rec.noise_version)
        if rec.noise_version == 0:
            seeds = [derive_seed_v0(rec.seed, k) for k in range(len(grads))]
        else:
            seeds = rec.seeds if rec.seeds is not None else []
            if len(seeds) != len(grads):
                raise ValueError(f"trajectory step {rec.step}: {len(seeds)} seeds for {len(grads)} projected gradients")
        trainer.apply_update(seeds, torch.tensor(grads, dtype=torch.float32), rec.lr, tensor_seed=tensor_seed)
    return {k: v.detach().clone() for k, v in engine.trainable_parameters().items()}
