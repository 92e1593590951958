"""Ahead-of-time compile every Triton kernel for sm_90 and sm_80 (no GPU needed) and report resources.

    python bench/kernels_aot_report.py               # whole matrix -> bench/results/kernels_sm90_resources.{md,json}
    python bench/kernels_aot_report.py --bench-only  # only the GPU benchmarks' configurations
    python bench/kernels_aot_report.py --out DIR --jobs 2

The matrix is `kernels.aot.matrix_specs` (tests/test_aot_compile.py reads the same): every configuration
the launchers (kernels/launch_config.py) choose for the benchmark shapes and the SmolLM2-135M / LLaMA-1B
/ LLaMA-8B shapes. Specs that Triton specializes identically are compiled once (~11,800 launcher cases
-> 142 compiles); the checks are `kernels.aot.check_rows`, as in the test. Runs without TRITON_INTERPRET.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the AOT check needs real JITFunctions, not interpreter wrappers
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import loadavg, md_table, run_metadata, write_results  # noqa: E402
from kernels.aot import ARCHS, check_rows, compile_all, dedupe, matrix_specs  # noqa: E402


def run(archs: tuple[int, ...], jobs: int, bench_only: bool = False) -> tuple[list[dict], dict]:
    start, load_before = time.perf_counter(), loadavg()
    requested = matrix_specs(archs, bench_only)
    unique = dedupe(requested)
    dedupe_s = time.perf_counter() - start
    rows = compile_all(unique, jobs)
    settings = {"archs": list(archs), "launcher_cases": len(requested), "configurations": len(rows),
                "wall_s": round(time.perf_counter() - start, 1), "dedupe_s": round(dedupe_s, 1), "jobs": jobs,
                "cpus": os.cpu_count(), "loadavg_1m": [load_before and load_before[0], (loadavg() or [None])[0]],
                "compile_s_sum": round(sum(r.get("compile_s", 0.0) for r in rows), 1)}
    return rows, settings


def _summary(rows: list[dict], arch: int) -> list[str]:
    table = []
    for kernel in sorted({r["kernel"] for r in rows if r["arch"] == arch}):
        sel = [r for r in rows if r["arch"] == arch and r["kernel"] == kernel and r["ok"]]
        failed = sum(1 for r in rows if r["arch"] == arch and r["kernel"] == kernel and not r["ok"])
        if not sel:
            table.append([kernel, f"{failed} FAILED"] + [""] * 8)
            continue
        table.append([kernel, f"{len(sel)}{f' (+{failed} FAILED)' if failed else ''}",
                      sum(r["launcher_cases"] for r in sel), max(r["registers"] for r in sel),
                      max(r["stack_frame"] for r in sel), max(r["spill_stores"] for r in sel),
                      sum(1 for r in sel if r["spill_stores"]), f"{max(r['shared'] for r in sel) / 1024:.1f}",
                      *(f"{sum(1 for r in sel if r[op])}/{len(sel)}" for op in ("wgmma", "mma"))])
    return [f"### sm_{arch}: per kernel", "", *md_table(table, [
        "kernel", "configurations", "launcher cases", "max regs", "max stack B", "spill stores B (max)",
        "configs that spill", "max shared KiB", "wgmma", "mma"]), ""]


def _md(rows: list[dict], s: dict, problems: list[str]) -> str:
    lines = [f"{s['launcher_cases']} launcher cases -> {s['configurations']} distinct compiles for "
             f"sm_{' / sm_'.join(map(str, s['archs']))} in {s['wall_s']} s wall with {s['jobs']} processes "
             f"on {s['cpus']} CPUs (1-minute load average {s['loadavg_1m'][0]} before, {s['loadavg_1m'][1]} after; "
             f"{s['compile_s_sum']} s summed compile time). Tests: `tests/test_aot_compile.py` runs the same.", "",
             "Matrix: the benchmarks' shapes (bench/bench_kernels.py, bench/bench_attention.py) and the SmolLM2-135M "
             "/ LLaMA-1B / LLaMA-8B shapes; token rows 1-4096; dtype fp32/bf16/fp16 (fp32 weights under 16-bit "
             "activations too); LoRA r 8/64; full-weight noise on/off; head_dim 64/128; GQA groups 1-8; page sizes "
             "1/16/64; every split count the decode launcher chooses; 64-bit seeds (32-bit too at the benchmark "
             "shapes). Cases Triton specializes identically are compiled once (the JSON rows' `cases` / `covers`).",
             "", "Registers, stack frame and spills from the wheel's `ptxas -v` (Triton's own flags); shared memory "
             "from the compiled kernel's metadata (limit: sm_90 227 KiB, sm_80 163 KiB per block); wgmma / mma: "
             "tensor-core instructions in the PTX. **bench** marks the configurations the GPU benchmarks run. "
             "Nothing here has run on a GPU.", "", "Why some dots are not wgmma on sm_90:", "",
             "- `_decode_split_kernel` (16-bit): BLOCK_H = 16 rows (the padded GQA group), below wgmma's 64-row "
             "minimum, so mma.sync; decode is bandwidth-bound, not MMA-bound.",
             "- extend tiles under 64 rows (fp32 tiles are halved): mma.sync for the same reason.",
             "- fp32 attention: `input_precision=\"ieee\"` (exact fp32 FMA dots) on purpose, no tensor cores.",
             "- fp32 LoRA / noise dots use tf32x3 (three tf32 MMAs), which is wgmma on sm_90.", ""]
    spills = [r for r in rows if r["ok"] and r["spill_stores"]]
    if spills:
        lines += ["Configurations that spill (benchmark ones fail the check):", ""]
        lines += [f"- sm_{r['arch']} {r['kernel']} [{r['config']}]{' **bench**' if r['benchmark'] else ''}: "
                  f"{r['spill_stores']} B stores / {r['spill_loads']} B loads" for r in spills] + [""]
    else:
        lines += ["No configuration spills registers, on sm_90 or sm_80.", ""]
    if problems:
        lines += ["## Problems", ""] + [f"- {p}" for p in problems] + [""]
    else:
        lines += ["All checks pass: every configuration compiles, fits shared memory, uses the expected "
                  "tensor-core instructions, and no benchmark configuration spills.", ""]
    lines += ["## Summary", ""]
    for arch in s["archs"]:
        lines += _summary(rows, arch)
    for arch in s["archs"]:
        table = [[r["kernel"], r["config"], "FAILED", "", "", "", "", "", "", r["error"][:80]] if not r["ok"] else
                 [r["kernel"], r["config"], r["registers"], r["stack_frame"], f"{r['spill_stores']}/{r['spill_loads']}",
                  f"{r['shared'] / 1024:.1f}", r["wgmma"], r["mma"], "yes" if r["benchmark"] else "",
                  f"{r['cases']} ({r['launcher_cases']})"]
                 for r in sorted((r for r in rows if r["arch"] == arch),
                                 key=lambda r: (r["kernel"], not r["benchmark"], r["config"]))]
        lines += [f"## sm_{arch}", "", *md_table(table, ["kernel", "config", "regs", "stack B", "spill st/ld B",
                                                         "shared KiB", "wgmma", "mma", "bench", "cases"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results/)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--bench-only", action="store_true", help="only the GPU benchmarks' configurations")
    ap.add_argument("--arch", type=int, action="append", help="compute capability (default: 90 and 80)")
    args = ap.parse_args(argv)
    rows, settings = run(tuple(args.arch or ARCHS), args.jobs, args.bench_only)
    problems = check_rows(rows)
    meta = {**run_metadata("cpu", __file__, argv), **settings}  # the JSON's "meta" also holds the run's settings
    _, mpath = write_results("kernels_sm90_resources", {"problems": problems, "rows": rows}, _md(rows, meta, problems),
                             device="cpu", script=__file__, argv=argv, out_dir=args.out, stem="kernels_sm90_resources",
                             meta=meta, title="Triton kernels compiled ahead of time: resources per configuration")
    print(f"{settings['configurations']} configurations in {settings['wall_s']} s -> {mpath}")
    for p in problems:
        print("PROBLEM:", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
