"""`mezo-engine bench`: the benchmark suite (kernels, attention, generation, MeZO step) in one command.

    mezo-engine bench --quick                 # minutes on a CPU: tiny shapes, checks every script runs
    mezo-engine bench --device cpu            # the CPU figures (SmolLM2-135M fp32; ~1 h on 2 cores)
    mezo-engine bench --device cuda           # the GPU figures (random 1B bf16); see also bench/gpu_suite.py

Each stage is a bench/ script in its own process with a time budget; results (JSON + markdown with
command, commit, date, device and versions) and one log per stage go under --out (default
bench/results/, or ./bench-results outside a checkout). A table of the headline figures prints last.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.stages import REPO_ROOT, Stage, Target, run_stages, summary  # noqa: E402


def default_out() -> Path:
    inside = (REPO_ROOT / "bench" / "results").is_dir() and (REPO_ROOT / ".git").exists()
    return REPO_ROOT / "bench" / "results" if inside else Path.cwd() / "bench-results"


def stages(device: str, quick: bool, out: Path) -> list[Stage]:
    py, o = sys.executable, ["--out-dir", str(out)]
    gpu = device == "cuda"
    if quick:
        return [
            Stage("kernels", [py, "bench/bench_kernels.py", "--quick", *o], 120,
                  [Target("unfused / fused noisy LoRA, torch path (r 8)", "kernels-quick_*.json", "figures.unfused_over_fused_r8")]),
            Stage("attention", [py, "bench/bench_attention.py", "--quick", *o], 120,
                  [Target("paged torch decode, ms (B 4, ctx 512)", "attention-quick_*.json", "figures.decode_torch_b4_ctx512_ms")]),
            Stage("generate", [py, "bench/bench_generate.py", "--quick", "--random-config", "tiny", "--device", device,
                               "--threads", "1", *o], 180,
                  [Target("generation: engine / transformers tok/s", "generate_*-quick*.json", "ratio_engine_over_transformers")]),
            Stage("mezo", [py, "bench/profile_mezo_step.py", "--random-config", "tiny", "--batch-size", "2",
                           "--rounds", "1", "--top", "0", *o], 240,
                  [Target("MeZO step: engine vs careful transformers loop", "mezo_step_profile_*.json",
                          "engine_speedup_vs_hf_loop")]),
        ]
    dev = ["--device", device]
    return [
        Stage("kernels", [py, "bench/bench_kernels.py", *dev, *o], 600,
              [Target("fused noisy LoRA / x@W.T (r 8)", "kernels_*.json", "figures.fused_over_plain_r8", "<=", 1.15),
               Target("unfused torch / fused (r 8)", "kernels_*.json", "figures.unfused_over_fused_r8", ">=", 2.0)]
              if gpu else []),
        Stage("attention", [py, "bench/bench_attention.py", *o], 900,
              [Target("decode B64 ctx2048: % of copy bandwidth", "attention_*.json", "figures.decode_b64_ctx2048_pct_copy", ">=", 60),
               Target("extend 1024+64 vs recompute (min over B)", "attention_*.json",
                      "figures.extend_min_speedup_vs_recompute", ">=", 5)] if gpu else []),
        Stage("generate", [py, "bench/bench_generate.py", *dev, *o], 3600,
              [Target("generation: engine / transformers tok/s", "generate_*.json", "ratio_engine_over_transformers",
                      ">=", 3.0 if gpu else 1.0)]),
        Stage("mezo", [py, "bench/bench_mezo.py", *dev, "--out-dir", str(out)], 7200,
              [Target("MeZO step vs reference (B 16)", "mezo_*.json", "scenarios.cls.speedup", ">=", 4.0 if gpu else 1.5),
               Target("MeZO step vs careful loop (B 16)", "mezo_*.json", "scenarios.cls.speedup_vs_hf_loop", ">=", 1.5),
               Target("MeZO, 16-shot prompt vs reference", "mezo_*.json", "scenarios.cls_16shot.speedup", ">=",
                      10.0 if gpu else 5.0)]),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mezo-engine bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks that every benchmark runs")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/)")
    ap.add_argument("--only", default=None, help="comma-separated stages (kernels, attention, generate, mezo)")
    ap.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    out = (args.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = stages(device, args.quick, out)
    if args.only:
        names = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = sorted(set(names) - {s.name for s in todo})
        if unknown:
            raise ValueError(f"--only: unknown stages {unknown}; choose from {[s.name for s in todo]}")
        todo = [s for s in todo if s.name in names]
    results = run_stages(todo, out, progress=not args.no_progress)
    table, _ = summary(todo, results, out)
    print(table)
    print(f"results and logs: {out}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
