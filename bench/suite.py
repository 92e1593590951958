"""`mezo-engine bench`: the benchmark suite (kernels, attention, generation, MeZO step) in one command.

    mezo-engine bench --quick                 # minutes on a CPU: tiny shapes, checks every script runs
    mezo-engine bench --device cpu            # the CPU figures (SmolLM2-135M fp32; ~1 h on 2 cores)
    mezo-engine bench --device cuda           # the GPU figures (random 1B bf16)
    mezo-engine bench --gpu                   # the GPU suite: <= 8 min on one H100/H200 (python bench/suite.py --gpu)
    mezo-engine bench --gpu --dry-run         # anywhere (CI): every GPU stage at toy size on the CPU

Each stage is a bench/ script (or pytest) in its own process with a time budget: a crash or an overrun
(killed) never takes the suite down. Results (JSON + markdown with command, commit, date, device and
versions) and one log per stage go under --out (default bench/results/, or ./bench-results outside a
checkout). Last, a table of the headline figures, each read back from its stage's JSON: figure, target,
met / MISSED / not measured; also in <out>/bench_summary.md (gpu_suite_summary.md for --gpu).

The GPU suite needs only what the GPU machine has (torch, triton 3.6-3.9, transformers, peft, pytest; no
network): random-weight LLaMA configs and synthetic token ids (bench/mezo_workloads.py) stand in for
SmolLM2 and the BBC corpus. Its stages: pytest on CUDA over the kernel and engine tests, then the kernel,
attention, MeZO-step, generation, bf16-estimator and n-perturbations-per-launch benchmarks.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO_ROOT, dotted, md_table, meets, write_results  # noqa: E402


@dataclass
class Target:
    """One figure a stage reports: where it is in the stage's JSON and what it should reach."""

    label: str
    json_glob: str          # file under the out dir, e.g. "kernels_*.json"
    path: str               # dotted path inside it, e.g. "figures.fused_over_plain_r8"
    op: str = ""            # ">=" | "<=" | "" (reported only)
    threshold: float | None = None

    def evaluate(self, out_dir: Path, since: float = 0.0) -> tuple[Any, bool | None]:
        """(value, met) from the newest matching file written after `since` (epoch s): never a stale one."""
        files = sorted((p for p in out_dir.glob(self.json_glob) if p.stat().st_mtime >= since),
                       key=lambda p: p.stat().st_mtime)
        if not files:
            return None, None
        value = dotted(json.loads(files[-1].read_text()), self.path)
        return value, meets(value, self.op, self.threshold)


@dataclass
class Stage:
    name: str
    argv: list[str]                       # run from the repository root
    budget_s: float
    targets: list[Target] = field(default_factory=list)


@dataclass
class StageResult:
    name: str
    status: str                           # "ok" | "failed (rc N)" | "over budget ..., stopped"
    seconds: float
    log: str
    started: float = 0.0                  # epoch seconds


def run_stages(stages: list[Stage], out_dir: Path, progress: bool = True) -> list[StageResult]:
    """Run the stages in order under a progress bar; each one's output goes to <out_dir>/logs/<name>.log."""
    from tqdm.auto import tqdm

    (out_dir / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    for stage in (bar := tqdm(stages, desc="bench", unit="stage", disable=not progress, file=sys.stderr)):
        bar.set_postfix_str(stage.name)
        log = out_dir / "logs" / f"{stage.name}.log"
        t0, started = time.perf_counter(), time.time()
        with open(log, "w") as fh:
            fh.write("$ " + " ".join(stage.argv) + "\n")
            fh.flush()
            proc = subprocess.Popen(stage.argv, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
            try:
                rc = proc.wait(timeout=stage.budget_s)
                status = "ok" if rc == 0 else f"failed (rc {rc})"
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)  # the stage's own process group: it and its workers, nothing else
                proc.wait()
                status = f"over budget ({stage.budget_s:.0f} s), stopped"
        results.append(StageResult(stage.name, status, time.perf_counter() - t0, str(log), started))
    return results


def summary(stages: list[Stage], results: list[StageResult], out_dir: Path,
            judge: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """A one-screen markdown table: each figure, its target, met / MISSED / not measured (judge=False: toy
    figures, shown without a verdict); then each stage's status."""
    by_name = {r.name: r for r in results}
    rows: list[dict[str, Any]] = []
    for st in stages:
        res = by_name.get(st.name)
        for t in st.targets:
            value, met = t.evaluate(out_dir, res.started) if res is not None else (None, None)
            rows.append({"stage": st.name, "figure": t.label, "value": value,
                         "target": f"{t.op} {t.threshold:g}" if t.threshold is not None else "",
                         "result": ({True: "met", False: "MISSED", None: "—"}[met] if judge else "(toy size)")
                         if value is not None else "not measured"})
    lines = md_table([[r[k] for k in ("figure", "value", "target", "result")] for r in rows],
                     ["figure", "value", "target", "result"])
    lines += ["", "stages: " + "; ".join(f"{r.name} {r.status} in {r.seconds:.0f} s" for r in results)]
    return "\n".join(lines), rows


# -- the stages ------------------------------------------------------------------------------------------
# The tests that exercise what runs on a GPU: the kernels compiled, the engine and a MeZO step on them
# (device-parametrized: fp32 and bf16 on CUDA), the CUDA sync check, data-parallel MeZO in a 1-rank NCCL
# group. The AOT compile check is a CPU test (it needs the CPU machine's newer Triton) and is not repeated here.
GPU_TESTS = ["tests/test_noise.py", "tests/test_noisy_lora.py", "tests/test_zo_update.py",
             "tests/test_attention_kernels.py", "tests/test_launch_config.py", "tests/test_engine_equivalence.py",
             "tests/test_kv_pool.py", "tests/test_engine_scheduling.py", "tests/test_kernels_switch.py",
             "tests/test_host_syncs.py", "tests/test_cuda_fakes.py", "tests/test_mezo_exactness.py",
             "tests/test_mezo_shared_prefix.py", "tests/test_perturbation_ids_triton.py", "tests/test_noise_norm.py",
             "tests/test_mezo_distributed.py::test_one_rank_group_matches_plain_trainer"]  # a 1-rank NCCL group
GPU_BUDGET_S = 480  # the whole GPU suite on one H100/H200
MODES = ("quick", "full", "dry", "gpu")  # the columns of the stage table below


def stages(mode: str, device: str, out: Path) -> list[Stage]:
    """One suite's stages, in order. mode: "quick" (toy sizes on `device`), "full" (the figures on
    `device`), "gpu" (the GPU suite) or "dry" (the GPU suite's stages at toy size on the CPU, with
    budgets for a shared CPU). A stage runs in the modes its table row gives arguments for."""
    missing = [t for t in GPU_TESTS if not (REPO_ROOT / t.split("::")[0]).is_file()]
    if missing:
        raise FileNotFoundError(f"bench/suite.py GPU_TESTS lists test files that do not exist: {missing}")
    toy, cuda = mode in ("quick", "dry"), mode == "gpu" or (mode == "full" and device == "cuda")
    q, one_b, sfx, mz = ["--quick"], ["--random-config", "1b"], "-quick" if toy else "", ["--tokenizer", "synthetic"]
    mz_json = {"quick": "mezo_quick.json", "full": "mezo_*.json"}.get(mode, "mezo_gpu_suite.json")
    k, a = f"kernels{sfx}_*.json", f"attention{sfx}_*.json"
    kernels = [Target("noisy LoRA fused / x@W.T (K=N=4096, M=8192, r 8)", k, "figures.fused_over_plain_r8", "<=", 1.15),
               Target("noisy LoRA unfused torch / fused (r 8)", k, "figures.unfused_over_fused_r8", ">=", 2.0)]
    attention = [Target("decode B64 ctx2048 page16: % of copy bandwidth", a,
                        "figures.decode_b64_ctx2048_pct_copy", ">=", 60),
                 Target("extend 1024 cached + 64 new vs recompute 1088", a,
                        "figures.extend_min_speedup_vs_recompute", ">=", 5)]
    if mode == "quick":  # the figures a toy run on the torch path has
        attention = [Target("paged torch decode, ms (B 4, ctx 512)", a, "figures.decode_torch_b4_ctx512_ms")]
    cls = "scenarios.cls."
    mezo = [Target("MeZO step: engine vs reference (cls, B 16)", mz_json, cls + "speedup", ">=", 4.0 if cuda else 1.5),
            Target("MeZO step: engine vs careful transformers loop", mz_json, cls + "speedup_vs_hf_loop", ">=",
                   None if cuda else 1.5)]
    if not toy:
        mezo.append(Target("  same, >= 512-token shared prompt vs reference", mz_json, "scenarios.cls_16shot.speedup",
                           ">=", 10.0 if cuda else 5.0))
    if mode in ("dry", "gpu"):
        mezo += [Target("ZO overhead (step / inference)", mz_json, cls + "zo_overhead", "<=", 1.05),
                 Target("peak memory finetune / inference", mz_json, cls + "memory.step_vs_inference_peak", "<=", 1.2)]
    mezo_args = ["--scenarios", "cls", "--steps", "1"]
    # name, script, arguments (quick, full, dry, gpu; None: not a stage there), budgets s, targets
    table = [
        ("tests", "pytest", (None, None, ["--collect-only", *GPU_TESTS], GPU_TESTS), (0, 0, 120, 100), []),
        ("kernels", "bench_kernels.py", (q, [], q, []), (120, 600, 120, 40), kernels if cuda or toy else []),
        ("attention", "bench_attention.py", (q, [], q, []), (120, 900, 120, 60), attention if cuda or toy else []),
        ("mezo", "bench_mezo.py", ([*q, *mezo_args, "--name", "mezo_quick"], [],
                                   [*q, *mz, *mezo_args, "--memory", "--name", "mezo_gpu_suite"],
                                   [*one_b, *mz, "--name", "mezo_gpu_suite", "--scenarios", "cls,cls_16shot",
                                    "--steps", "2", "--warmup", "1"]), (240, 7200, 300, 150), mezo),
        ("generate", "bench_generate.py", ([*q, "--threads", "1"], [], [*q, "--threads", "1"],
                                           [*one_b, "--num-prompts", "64", "--max-tokens", "64", "--repeats", "1"]),
         (180, 3600, 180, 60), [Target("generation: engine / transformers tok/s", f"generate_*{sfx}*.json",
                                       "ratio_engine_over_transformers", ">=",
                                       1.0 if mode == "full" and not cuda else 3.0)]),
        ("sign", "bench_estimators.py", (None, None, ["--sign-agreement", *q, "--batch-size", "4"],
                                         ["--sign-agreement", *one_b, "--seeds", "32"]), (0, 0, 180, 40),
         [Target("bf16 estimator sign agreement", f"sign_agreement{sfx}_*.json", "figures.bf16_sign_agreement", ">=",
                 0.9)]),
        ("estimators", "bench_estimators.py", (None, None, [*q, "--threads", "1"],
                                               [*one_b, "--scenario", "cls", "--n", "4", "--batch-size", "16"]),
         (0, 0, 120, 30), [Target("n-SPSA n = 4 step / n = 1 step (B 16)",
                                  "estimators_*_quick.json" if toy else "estimators_*.json", "cost_ratio_n_vs_1", "<=",
                                  1.5)]),
    ]
    i, dev = MODES.index(mode), {"dry": "cpu", "gpu": "cuda"}.get(mode, device)
    out_stages = []
    for name, script, args, budgets, targets in table:
        if args[i] is None:
            continue
        head = ["-m", "pytest", "-q", "-p", "no:cacheprovider"] if script == "pytest" else [f"bench/{script}"]
        tail = [] if script == "pytest" else ["--device", dev, "--out-dir", str(out)]
        out_stages.append(Stage(name, [sys.executable, *head, *args[i], *tail], budgets[i], targets))
    return out_stages


def preflight(gpu: bool, dry_run: bool) -> list[str]:
    """What is missing on this machine, as lines for the report (the suite still runs what it can)."""
    notes = [f"{mod} is not installed: {why} will fail" for mod, why in (
        ("pytest", "the tests stage"), ("peft", "the MeZO reference and hf-loop contestants"),
        ("triton", "every GPU kernel")) if importlib.util.find_spec(mod) is None]
    import torch

    if gpu and not dry_run and not torch.cuda.is_available():
        notes.append("no CUDA device: the GPU stages will fail (use --dry-run to check the suite on a CPU)")
    from kernels import triton_supported, triton_version

    if triton_version() is not None and not triton_supported():
        notes.append(f"triton {triton_version()} is outside the supported range (kernels/_triton.py SUPPORTED)")
    return notes


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks that every benchmark runs")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--gpu", action="store_true", help="the GPU suite: CUDA tests + every GPU stage (<= 8 min)")
    ap.add_argument("--dry-run", action="store_true", help="--gpu with every stage at toy size on the CPU (CI)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/)")
    ap.add_argument("--only", default=None, help="comma-separated stages (kernels, attention, generate, mezo; "
                                                 "--gpu also tests, sign, estimators)")
    ap.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    import torch

    gpu, dry = args.gpu or args.dry_run, args.dry_run
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available() and not gpu:
        raise ValueError("--device cuda: no CUDA device is visible to torch")
    inside = (REPO_ROOT / "bench" / "results").is_dir() and (REPO_ROOT / ".git").exists()
    out = (args.out or (REPO_ROOT / "bench" / "results" if inside else Path.cwd() / "bench-results")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    assert sum(s.budget_s for s in stages("gpu", "cuda", out)) <= GPU_BUDGET_S, "GPU stage budgets exceed 8 minutes"
    mode = ("dry" if dry else "gpu") if gpu else ("quick" if args.quick else "full")
    todo = stages(mode, device, out)
    only = [s.strip() for s in (args.only or "").split(",") if s.strip()]
    if set(only) - {s.name for s in todo}:
        raise ValueError(f"--only: unknown stages {sorted(set(only) - {s.name for s in todo})}; "
                         f"choose from {[s.name for s in todo]}")
    todo = [s for s in todo if s.name in only or not only]
    notes = preflight(gpu, dry)
    for n in notes:
        print("note:", n, flush=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = argv[1:] if argv[:1] == ["bench"] else argv  # as `mezo-engine bench ...`: the suite's own arguments
    t0 = time.perf_counter()
    results = run_stages(todo, out, progress=not args.no_progress)
    table, rows = summary(todo, results, out, judge=mode in ("full", "gpu"))
    if dry:
        table = "DRY RUN (toy sizes on the CPU: these are not GPU figures)\n" + table
    wall = time.perf_counter() - t0
    payload = {"gpu_suite": gpu, "dry_run": dry, "wall_s": wall, "notes": notes, "figures": rows,
               "stages": [r.__dict__ for r in results]}
    md = "\n".join(f"- note: {n}" for n in notes) + f"\n\nWhole suite {wall:.0f} s.\n\n```\n{table}\n```"
    stem = "gpu_suite_summary" if gpu else "bench_summary"
    write_results(stem, payload, md, title=("GPU suite" if gpu else "Benchmark suite") + (" (dry run)" if dry else ""),
                  device="cpu" if dry else device, script=__file__, argv=argv, out_dir=out, stem=stem)
    print(f"\n{table}\nwhole suite {wall:.0f} s; results and logs under {out}")
    return 0 if all(r.status == "ok" for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mezo-engine bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
