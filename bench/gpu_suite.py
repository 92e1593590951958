"""The GPU suite: one command that runs the GPU tests and every GPU benchmark, then prints the targets.

    python bench/gpu_suite.py                  # on one H100/H200: <= 8 min, writes under bench/results/
    python bench/gpu_suite.py --out /tmp/gpu   # results elsewhere
    python bench/gpu_suite.py --dry-run        # anywhere (CI): every stage at toy size on the CPU

Needs only what the GPU machine has (torch, triton 3.6-3.9, transformers, peft, pytest; no network):
random-weight LLaMA configs and synthetic token ids (bench/mezo_workloads.py) stand in for SmolLM2 and the
BBC corpus. Stages, each in its own process with a time budget (an overrun is stopped, the suite goes
on): pytest on CUDA over the kernel and engine tests, then the kernel, attention, MeZO-step,
generation, bf16-estimator and n-perturbations-per-launch benchmarks at their GPU targets. The last screen is a table: each
figure, its target, met / MISSED / not measured; the same table goes to <out>/gpu_suite_summary.md
(and .json), with the command, commit, date and device like every result file. The stage runner
and the targets shared with `mezo-engine bench` live in bench/suite.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_results  # noqa: E402
from bench.suite import (REPO_ROOT, Stage, Target, attention_targets, generate_target, kernel_targets,  # noqa: E402
                         run_stages, select, summary)

# The tests that exercise what runs on a GPU: the kernels compiled, the engine and a MeZO step on them
# (device-parametrized: fp32 and bf16 on CUDA), the CUDA sync check. The AOT compile check is a CPU
# test (it needs the CPU machine's newer Triton) and is not repeated here.
GPU_TESTS = ["tests/test_noise.py", "tests/test_noisy_lora.py", "tests/test_zo_update.py",
             "tests/test_attention_kernels.py", "tests/test_launch_config.py", "tests/test_engine_equivalence.py",
             "tests/test_kv_pool.py", "tests/test_engine_scheduling.py", "tests/test_kernels_switch.py",
             "tests/test_host_syncs.py", "tests/test_cuda_fakes.py", "tests/test_mezo_exactness.py",
             "tests/test_mezo_shared_prefix.py", "tests/test_perturbation_ids_triton.py", "tests/test_noise_norm.py"]
TOTAL_BUDGET_S = 480


def stages(out: Path, dry_run: bool) -> list[Stage]:
    py, o = sys.executable, ["--out-dir", str(out)]
    missing = [t for t in GPU_TESTS if not (REPO_ROOT / t).is_file()]
    if missing:
        raise FileNotFoundError(f"bench/gpu_suite.py lists test files that do not exist: {missing}")
    tests, sign = GPU_TESTS, "bf16 estimator sign agreement"
    if dry_run:  # every stage starts and runs at toy size on the CPU; figures are not GPU figures
        q = ["--quick"]
        return [
            Stage("tests", [py, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", *tests], 120),
            Stage("kernels", [py, "bench/bench_kernels.py", *q, "--device", "cpu", *o], 120, kernel_targets("kernels-quick")),
            Stage("attention", [py, "bench/bench_attention.py", *q, *o], 120, attention_targets("attention-quick")),
            Stage("mezo", [py, "bench/bench_mezo.py", *q, "--device", "cpu", "--tokenizer", "synthetic", "--scenarios",
                           "cls", "--steps", "1", "--name", "mezo_gpu_suite", *o], 300, _mezo_targets()),
            Stage("generate", [py, "bench/bench_generate.py", *q, "--device", "cpu", "--threads", "1", *o], 180,
                  [generate_target("generate_*-quick*.json")]),
            Stage("sign", [py, "bench/bench_sign_agreement.py", *q, "--device", "cpu", "--batch-size", "4", *o], 180,
                  [Target(sign, "sign_agreement-quick_*.json", "figures.bf16_sign_agreement", ">=", 0.9)]),
            Stage("estimators", [py, "bench/bench_estimators.py", *q, "--device", "cpu", "--threads", "1", *o], 120,
                  [_estimators_target("estimators_*_quick.json")]),
        ]
    return [
        Stage("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], 100),
        Stage("kernels", [py, "bench/bench_kernels.py", "--device", "cuda", *o], 40, kernel_targets("kernels")),
        Stage("attention", [py, "bench/bench_attention.py", *o], 60, attention_targets("attention")),
        Stage("mezo", [py, "bench/bench_mezo.py", "--device", "cuda", "--random-config", "1b", "--tokenizer", "synthetic",
                       "--scenarios", "cls,cls_16shot", "--steps", "2", "--warmup", "1",
                       "--name", "mezo_gpu_suite", *o], 150, _mezo_targets()),
        Stage("generate", [py, "bench/bench_generate.py", "--device", "cuda", "--random-config", "1b",
                           "--num-prompts", "64", "--max-tokens", "64", "--repeats", "1", *o], 60,
              [generate_target("generate_*.json")]),
        Stage("sign", [py, "bench/bench_sign_agreement.py", "--device", "cuda", "--random-config", "1b",
                       "--seeds", "32", *o], 40,
              [Target(sign, "sign_agreement_*.json", "figures.bf16_sign_agreement", ">=", 0.9)]),
        Stage("estimators", [py, "bench/bench_estimators.py", "--device", "cuda", "--random-config", "1b",
                             "--scenario", "cls", "--n", "4", "--batch-size", "16", *o], 30,
              [_estimators_target("estimators_*.json")]),
    ]


def _estimators_target(pattern: str) -> Target:
    return Target("n-SPSA n = 4 step / n = 1 step (B 16)", pattern, "cost_ratio_n_vs_1", "<=", 1.5)


def _mezo_targets() -> list[Target]:
    f = "mezo_gpu_suite.json"
    return [Target("MeZO-LoRA step vs reference (1B, B 16)", f, "scenarios.cls.speedup", ">=", 4),
            Target("  same, >= 512-token shared prompt", f, "scenarios.cls_16shot.speedup", ">=", 10),
            Target("  vs careful transformers loop", f, "scenarios.cls.speedup_vs_hf_loop"),
            Target("ZO overhead (step / inference)", f, "scenarios.cls.zo_overhead", "<=", 1.05),
            Target("peak memory finetune / inference", f, "scenarios.cls.memory.step_vs_inference_peak", "<=", 1.2)]


def preflight(dry_run: bool) -> list[str]:
    """What is missing on this machine, as lines for the report (the suite still runs what it can)."""
    notes = []
    for mod, why in (("pytest", "the tests stage"), ("peft", "the MeZO reference and hf-loop contestants"),
                     ("triton", "every GPU kernel")):
        if importlib.util.find_spec(mod) is None:
            notes.append(f"{mod} is not installed: {why} will fail")
    import torch

    if not dry_run and not torch.cuda.is_available():
        notes.append("no CUDA device: the GPU stages will fail (use --dry-run to check the suite on a CPU)")
    from kernels import triton_supported, triton_version

    if triton_version() is not None and not triton_supported():
        notes.append(f"triton {triton_version()} is outside the supported range (kernels/_triton.py SUPPORTED)")
    return notes


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    ap.add_argument("--dry-run", action="store_true", help="every stage at toy size on the CPU (CI)")
    ap.add_argument("--only", default=None, help="comma-separated stages: tests,kernels,attention,mezo,generate,sign,estimators")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    todo = select(stages(out, args.dry_run), args.only)
    assert sum(s.budget_s for s in stages(out, False)) <= TOTAL_BUDGET_S, "stage budgets exceed the suite's 8 minutes"
    notes = preflight(args.dry_run)
    for n in notes:
        print("note:", n, flush=True)
    t0 = time.perf_counter()
    results = run_stages(todo, out, progress=not args.no_progress)
    table, rows = summary(todo, results, out, judge=not args.dry_run)
    if args.dry_run:
        table = "DRY RUN (toy sizes on the CPU: these are not GPU figures)\n" + table
    wall = time.perf_counter() - t0
    payload = {"dry_run": args.dry_run, "wall_s": wall, "notes": notes, "figures": rows,
               "stages": [r.__dict__ for r in results]}
    md = "\n".join(f"- note: {n}" for n in notes) + f"\n\nWhole suite {wall:.0f} s.\n\n```\n{table}\n```"
    write_results("gpu_suite_summary", payload, md, title="GPU suite" + (" (dry run)" if args.dry_run else ""),
                  device="cpu" if args.dry_run else "auto", script=__file__, argv=argv, out_dir=out,
                  stem="gpu_suite_summary")
    print(f"\n{table}\nwhole suite {wall:.0f} s; logs under {out / 'logs'}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
