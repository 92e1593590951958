"""Crash-safe persistence: atomic files, PEFT-format LoRA adapters, the seed trajectory, and
training checkpoints that are either complete or absent (DESIGN §11)."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .seeds import NOISE_VERSION
from engine.adapter_io import (  # noqa: F401  (re-exported: checkpoints are built from these)
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, PathLike, _fsync_dir, atomic_save_safetensors, atomic_write,
    atomic_write_bytes, atomic_write_json, load_peft_adapter, normalize_peft_key, save_peft_adapter,
)

# ---- trajectory log ---------------------------------------------------------------------------
@dataclass
class TrajectoryRecord:
    """One MeZO step; with the initial weights, the records replay the whole run."""

    step: int
    seed: int  # the sample seed of SPSA sample 0 (version 0: the step seed the samples derive from)
    projected_grad: float | list[float]  # a list for n-SPSA (one value per direction)
    lr: float
    loss: float
    seeds: list[int] | None = None  # version >= 1: every sample seed of the step, one per gradient
    noise_version: int = NOISE_VERSION  # how seeds map to noise (mezo.seeds); lines without it are 0
    skipped: bool = False  # the run did not update at this step (non-finite loss or projected gradient)
    # issue 14: what apply_update got (one per seed; older logs: None, the projected gradients were it),
    # the estimator, its per-branch losses (launch order, mezo/estimators.py) and ‖z_k‖ when normalized
    coefficients: list[float] | None = None
    estimator: str = "spsa"
    branch_losses: list[float] | None = None
    norms: list[float] | None = None


def drop_torn_tail(path: PathLike) -> None:
    """Cut an unterminated last line (a kill mid-append) off a JSONL file, so that the next append is
    not glued to the fragment. A record counts once its newline is on disk."""
    path = Path(path)
    if path.is_file():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
                os.fsync(fh.fileno())


def append_jsonl(path: PathLike, obj: Any) -> None:
    """Append one JSON line and fsync it: a kill loses at most this line, left unterminated (which
    readers ignore and `drop_torn_tail` removes). Non-finite floats are written as NaN/Infinity."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: PathLike, what: str = "JSON line") -> list[Any]:
    """The committed records of a JSONL log (an unterminated last line is ignored); ValueError naming
    the line for a corrupt complete line."""
    path = Path(path)
    if not path.is_file():
        return []
    committed = path.read_text(encoding="utf-8").rpartition("\n")[0]
    out = []
    for i, line in enumerate(committed.split("\n") if committed else []):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i + 1}: corrupt {what} ({e})") from None
    return out


class TrajectoryLog:
    """Append-only JSONL (see `append_jsonl`); ``read`` ignores an unterminated last line, and opening
    the log drops one. Rewrites (``truncate``) are atomic."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        drop_torn_tail(self.path)

    def append(self, rec: TrajectoryRecord) -> None:
        append_jsonl(self.path, asdict(rec))

    def read(self) -> list[TrajectoryRecord]:
        out = []
        for i, fields in enumerate(read_jsonl(self.path, "trajectory record")):
            try:
                fields.setdefault("noise_version", 0)  # written before noise versions existed
                out.append(TrajectoryRecord(**fields))
            except (TypeError, AttributeError) as e:
                raise ValueError(f"{self.path}:{i + 1}: corrupt trajectory record ({e})") from None
        return out

    def truncate(self, n_records: int) -> None:
        """Keep the first ``n_records`` (resume: steps after the checkpoint are redone)."""
        keep = self.read()[:n_records]
        atomic_write_bytes(self.path, "".join(json.dumps(asdict(r)) + "\n" for r in keep).encode())


# ---- training checkpoints ---------------------------------------------------------------------
_CKPT = re.compile(r"^ckpt-(\d+)$")


@dataclass
class TrainingCheckpoint:
    """Everything needed to resume: trainable tensors (fp32), config dict, step, trajectory length."""

    step: int
    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]
    trajectory_len: int
    extra: dict[str, Any] = field(default_factory=dict)
    noise_version: int = NOISE_VERSION  # checkpoints of format 1 predate versions: 0

    def save(self, directory: PathLike) -> Path:
        """Write ``<directory>/ckpt-<step>`` via a temp dir + rename: it is complete or absent."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / f"ckpt-{self.step}"
        tmp = Path(tempfile.mkdtemp(dir=directory, prefix=f".tmp-ckpt-{self.step}-"))
        try:
            atomic_save_safetensors(tmp / "trainable.safetensors", self.tensors)
            state = {"format": 2, "noise_version": self.noise_version, "step": self.step,
                     "trajectory_len": self.trajectory_len, "config": self.config, "extra": self.extra}
            atomic_write_json(tmp / "state.json", state)
            old = None
            if final.exists():  # re-saving a step after a resume: swap, then delete the old one
                old = directory / f".old-ckpt-{self.step}-{os.getpid()}"
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    @classmethod
    def load(cls, path: PathLike) -> "TrainingCheckpoint":
        """ValueError naming the file if the checkpoint cannot be read (corrupt or torn)."""
        path = Path(path)
        try:
            state = json.loads((path / "state.json").read_text())
            tensors = load_file(path / "trainable.safetensors")
        except Exception as e:  # JSON, OS or safetensors errors alike: this checkpoint is unusable
            raise ValueError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to resume "
                             "from an older one") from None
        return cls(step=state["step"], tensors=tensors, config=state["config"],
                   trajectory_len=state["trajectory_len"], extra=state.get("extra", {}),
                   noise_version=int(state.get("noise_version", 0)))


def latest_checkpoint(directory: PathLike) -> Path | None:
    """Highest-step complete ``ckpt-<step>`` directory; temp/old dirs (dot-prefixed) are ignored."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for p in directory.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            if best is None or int(m[1]) > best[0]:
                best = (int(m[1]), p)
    return best[1] if best else None

