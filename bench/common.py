"""The benchmarks' shared harness: timing through libraries, one results writer, machine metadata,
the options every model benchmark shares, and the random-weight LLaMA models the GPU runs use.

Timing: `bench_ms` (short calls) is `triton.testing.do_bench` on a GPU (CUDA events, L2 flushed, median)
and `torch.utils.benchmark.Timer.blocked_autorange` on a CPU (median of blocks); `bench_seconds` (calls
of a second or more) is stdlib `timeit`, one call per sample, CUDA synchronised around each (torch's
Timer adds two hidden warm-up calls per sample, which a state-resetting caller cannot afford).

Results: `write_results` writes `<out_dir>/<name>_<device slug>.json` and `.md`, both with the same
`run_metadata`: command, date, git commit (and a dirty tree), device and its name (slug `cpu`, or e.g.
`nvidia-h100-80gb-hbm3`), CPU, threads, load average, torch / triton / transformers / peft / python.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import timeit
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "bench" / "results"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Random-weight LLaMA shapes (plain data); each benchmark adds its own vocabulary and context length.
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True, rope_theta=10000.0),
    # SmolLM2-135M's shape
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True, rope_theta=100000.0),
    # Llama-3.2-1B's shape (~1.24B parameters with its own vocabulary)
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-2-7B's shape (~6.7B parameters with its own vocabulary)
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, tie_word_embeddings=False, rope_theta=10000.0),
}


def random_llama(shape: str, vocab_size: int, context: int, dtype: torch.dtype, device: str | torch.device,
                 seed: int = 0) -> Any:
    """A transformers LlamaForCausalLM of LLAMA_SHAPES[shape] with seeded random weights (bos 1, eos 2,
    pad 0), built directly on `device` in `dtype`, eval mode. Same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**LLAMA_SHAPES[shape], vocab_size=vocab_size, max_position_embeddings=context,
                      rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    with torch.device(device):
        return LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith(("model name", "hardware"))]
    except OSError:
        names = []
    return names[0] if names else (platform.processor() or platform.machine() or "unknown")


def loadavg() -> list[float] | None:
    """The 1/5/15-minute load average, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # no getloadavg on this OS, or it could not be read
        return None


def _git(*args: str) -> str | None:
    """stdout of a read-only git query in the checkout, or None outside one."""
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(script: str | Path, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run, e.g. 'python bench/bench_generate.py --quick'."""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = Path(script).resolve()
    path = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    return " ".join(["python", shlex.quote(str(path)), *map(shlex.quote, argv)])


def md_cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]


def dotted(obj: Any, path: str) -> Any:
    """obj["a"]["b"] for path "a.b"; None where a part is missing."""
    for part in path.split("."):
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


def meets(value: Any, op: str, threshold: float | None) -> bool | None:
    """Whether a figure meets its target (op ">=" or "<="); None when either is not a number."""
    if not isinstance(value, (int, float)) or threshold is None:
        return None
    return value >= threshold if op == ">=" else value <= threshold


# -- arguments ------------------------------------------------------------------------------------------
def base_args(doc: str | None) -> argparse.ArgumentParser:
    """A parser with the options of every benchmark script: --device, --quick, --out-dir."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--quick", action="store_true", help="tiny model and sizes (CI smoke test)")
    ap.add_argument("--out-dir", "--out", type=Path, default=None, help="results folder (default bench/results/)")
    return ap


def standard_args(doc: str | None) -> argparse.ArgumentParser:
    """`base_args` and the options every model benchmark shares: --model / --random-config, --dtype,
    --threads (resolved by `resolve_standard_args`)."""
    ap = base_args(doc)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="built-in name, HF directory or .gguf (default on CPU: smollm2-135m)")
    src.add_argument("--random-config", choices=sorted(LLAMA_SHAPES), default=None,
                     help="random-weight LLaMA shape (default on GPU: 1b; --quick: tiny)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="auto = float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 on a shared machine avoids OpenMP stalls)")
    return ap


def resolve_standard_args(args: argparse.Namespace, quick: dict[str, Any], full: dict[str, Any]) -> argparse.Namespace:
    """Resolve the device; default the model (--quick: random tiny; GPU: random 1b; CPU: smollm2-135m)
    and the dtype (bfloat16 on GPU, else float32); set every option still None from `quick` or `full`."""
    args.device = resolve_device(args.device)
    on_gpu = args.device.type == "cuda"
    if args.model is None and args.random_config is None:
        args.random_config = "tiny" if args.quick else ("1b" if on_gpu else None)
        args.model = None if args.random_config else "smollm2-135m"
    for key, val in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if on_gpu else "float32"
    return args


# -- timing ---------------------------------------------------------------------------------------------
def bench_ms(fn: Callable[[], Any], device: str | torch.device, min_run_s: float = 0.2) -> float:
    """Median milliseconds per call of a short `fn` (kernels, single launches)."""
    if resolve_device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_s).median * 1e3


def bench_seconds(fn: Callable[[], Any], device: str | torch.device, repeats: int = 3) -> float:
    """Median wall seconds of `repeats` single calls of a long `fn` (a generation run, a MeZO step),
    with no hidden warm-up call (the caller warms up, and some callers reset state between calls).
    stdlib timeit with a clock that synchronises CUDA; garbage collection stays on (timeit's
    documented `gc.enable()` setup), so a call's memory behaves as in real use."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    cuda = resolve_device(device).type == "cuda"

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return timeit.default_timer()

    timer = timeit.Timer(fn, setup="gc.enable()", timer=clock, globals={"gc": gc})
    return statistics.median(timer.repeat(repeat=repeats, number=1))


def timed(fn: Callable[[], Any], device: str | torch.device) -> tuple[Any, float]:
    """(fn(), seconds) of one call, timed by `bench_seconds`."""
    box: dict[str, Any] = {}
    seconds = bench_seconds(lambda: box.__setitem__("out", fn()), device, repeats=1)
    return box["out"], seconds


# -- results --------------------------------------------------------------------------------------------
def run_metadata(device: str | torch.device, script: str | Path, argv: Sequence[str] | None) -> dict[str, Any]:
    """What every result file carries: how to reproduce it and where it ran."""
    from importlib.metadata import PackageNotFoundError, version

    dev = resolve_device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_model()
    status = _git("status", "--porcelain", "--untracked-files=no")
    meta = {"command": command_line(script, argv),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "--short", "HEAD") or None,
            "dirty_tree": None if status is None else bool(status), "device": str(dev), "device_name": name,
            "device_slug": "cpu" if dev.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"),
            "cpu_model": cpu_model(), "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "platform": platform.platform(), "loadavg": loadavg(), "python": platform.python_version(),
            "torch": torch.__version__}
    for pkg in ("triton", "transformers", "peft"):
        try:  # (nightly / ROCm torch ship Triton as pytorch-triton: the module exists, this distribution not)
            meta[pkg] = version(pkg)
        except PackageNotFoundError:
            meta[pkg] = None
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, gpu_count=torch.cuda.device_count())
    return meta


def write_results(name: str, payload: dict[str, Any], markdown: str, *, title: str, device: str | torch.device,
                  script: str | Path, argv: Sequence[str] | None, out_dir: str | Path | None = None,
                  variant: str = "", stem: str | None = None, meta: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>_<device slug><variant>.json` ({"meta": ..., **payload}) and `.md` (title,
    metadata, `markdown`); `stem` replaces the whole file name when given, `meta` the metadata taken
    now (a `run_metadata` from the start of the run). Returns both paths and adds the metadata to
    `payload` as "meta" (so what a script returns is what it saved). `out_dir` defaults to bench/results/."""
    meta = payload["meta"] = meta or run_metadata(device, script, argv)
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or f"{name}_{meta['device_slug']}{variant}"
    jpath, mpath = out / f"{stem}.json", out / f"{stem}.md"
    jpath.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    versions = ", ".join(f"{k} {meta.get(k)}" for k in ("torch", "triton", "transformers", "peft", "python"))
    dirty = " (uncommitted changes)" if meta.get("dirty_tree") else ""
    mpath.write_text(f"# {title}\n\n`{meta['command']}`\n\n{meta['date']}; commit {meta['commit']}{dirty}; "
                     f"{meta['device_name']} ({meta['device']}, {meta['torch_threads']} torch threads); load average "
                     f"{meta['loadavg']}; {versions}\n\n{markdown.strip()}\n")
    return jpath, mpath
