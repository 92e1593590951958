"""Helpers shared by the benchmarks: device naming, machine description, timing, saving results.

Every benchmark writes `<out_dir>/<name>.json` (machine-readable, with the exact command line and the
machine it ran on) and `<out_dir>/<name>.md` (the same numbers for people); `<name>` contains the
device slug (`cpu`, or the GPU's name such as `nvidia-h100-80gb-hbm3`) so results from different
machines sit side by side.
"""
from __future__ import annotations


import datetime as _dt
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str | torch.device) -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_model()


def device_slug(device: str | torch.device) -> str:
    """'cpu' for any CPU (the machine details live inside the results), else the GPU name's slug."""
    dev = resolve_device(device)
    return "cpu" if dev.type == "cpu" else slug(device_name(dev))


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _git_commit() -> str | None:
    try:  # read-only query
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(script: str | Path, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, e.g. 'python bench/bench_generate.py --quick'."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = Path(script).resolve()
    try:
        path = path.relative_to(REPO_ROOT)
    except ValueError:
        pass
    return " ".join(["python", shlex.quote(str(path)), *map(shlex.quote, argv)])


def machine_info(device: str | torch.device) -> dict[str, Any]:
    """Versions and hardware, enough to tell two result files apart."""
    dev = resolve_device(device)
    info: dict[str, Any] = {
        "device": str(dev),
        "device_name": device_name(dev),
        "device_slug": device_slug(dev),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_commit": _git_commit(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    return info


def sync(device: str | torch.device) -> None:
    if resolve_device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, float]:
    """(fn(), wall seconds), with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


def save_results(payload: dict[str, Any], markdown: str, out_dir: str | Path | None, name: str) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` and `.md`; returns both paths."""
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    jpath, mpath = out / f"{name}.json", out / f"{name}.md"
    jpath.write_text(json.dumps(payload, indent=2) + "\n")
    mpath.write_text(markdown.rstrip() + "\n")
    return jpath, mpath


def median_ms_cpu(fn: Callable[[], object], warmup: int = 2, iters: int = 15) -> float:
    """Median wall milliseconds per call on the host."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def median_ms_cuda(fn: Callable[[], object], warmup: int = 5, iters: int = 30,
                   before_each: Callable[[], object] | None = None) -> float:
    """Median milliseconds per call between CUDA events; `before_each` (e.g. an L2 flush) is not timed."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before_each is not None:
            before_each()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
