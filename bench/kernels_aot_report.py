"""Ahead-of-time compile every Triton kernel for sm_90 and sm_80 (no GPU needed) and report resources.

    python bench/kernels_aot_report.py               # whole matrix -> bench/results/kernels_sm90_resources.{md,json}
    python bench/kernels_aot_report.py --bench-only  # only the GPU benchmarks' configurations
    python bench/kernels_aot_report.py --out DIR --jobs 2

Each kernel is compiled at every configuration its launcher chooses (kernels/launch_config.py) for the
benchmark shapes (bench/bench_kernels.py, bench/bench_attention.py) and the SmolLM2-135M / LLaMA-1B /
LLaMA-8B shapes: dtype fp32/bf16/fp16, LoRA r 8 and 64, full-weight noise on/off (fp32 or 16-bit
weights), head_dim 64/128, GQA groups 1-8, page sizes 1/16/64, 64-bit seeds (32-bit ones too at the
benchmark shapes). Specs that specialize identically (Triton's own argument specialization, constexprs,
warps/stages, target) are compiled once: ~11,800 launcher cases (each noisy-LoRA launch with and without per-row
perturbation ids) -> 142 distinct compiles. The checks (kernels.aot.check_rows) are
those tests/test_aot_compile.py asserts. Run without TRITON_INTERPRET (it is removed here).
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

import torch  # noqa: E402

from bench.common import LLAMA_SHAPES, loadavg, md_table, run_metadata, write_results  # noqa: E402
from kernels.aot import (CompileSpec, check_rows, compile_all, decode_specs, dedupe, extend_specs,  # noqa: E402
                         noisy_linear_specs, randn_specs, zo_update_specs)
from kernels.attention import choose_num_kv_splits  # noqa: E402

ARCHS = (90, 80)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED64, SEED32 = (1 << 40) + 12345, 12345  # seeds >= 2^31 reach the kernels as i64
# (hidden, intermediate, heads, kv heads) of the model shapes the check covers
MODELS = {name: (LLAMA_SHAPES[name]["hidden_size"], LLAMA_SHAPES[name]["intermediate_size"],
                 LLAMA_SHAPES[name]["num_attention_heads"], LLAMA_SHAPES[name]["num_key_value_heads"])
          for name in ("smollm2", "1b")}
MODELS["8b"] = (4096, 14336, 32, 8)  # Llama-3-8B
BENCH_MKN = (2 * 16 * 256, 4096, 4096)  # bench/bench_kernels.py
BENCH_ATTN = dict(heads=32, kv_heads=8, head_dim=128, page_size=16, dtype=torch.bfloat16)  # bench_attention.py
DECODE_BATCHES, DECODE_CONTEXTS, EXTEND_BATCHES = (1, 16, 64), (512, 2048, 8192), (1, 8, 32)
ROWS = (1, 16, 32, 64, 65, 4096)  # token rows of a noisy linear: both BLOCK_M buckets and their edges
# (LoRA rank, full-weight noise, weights in fp32): LoRA mode keeps the model's weight dtype;
# full-parameter mode keeps fp32 weights under 16-bit activations (engine/linear.py) or 16-bit ones (bench).
LINEAR_MODES = ((8, False, False), (64, False, False), (0, True, False), (0, True, True), (8, True, False),
                (8, True, True), (64, True, False), (64, True, True))


def _bench_specs(arch: int) -> list[CompileSpec]:
    m, n, k = BENCH_MKN
    bf = torch.bfloat16
    out = []
    for seed in (SEED64, SEED32):
        for r in (8, 64):
            out += noisy_linear_specs(m, n, k, r, bf, bf, False, arch, seed, label="bench_kernels lora", benchmark=True)
        out += noisy_linear_specs(m, n, k, 0, bf, bf, True, arch, seed, label="bench_kernels full", benchmark=True)
    a = BENCH_ATTN
    out += extend_specs(a["heads"], a["kv_heads"], a["head_dim"], a["dtype"], a["page_size"], arch,
                        label="bench_attention extend", benchmark=True)
    for bsz in DECODE_BATCHES:
        for ctx in DECODE_CONTEXTS:
            splits = choose_num_kv_splits(ctx, bsz, a["kv_heads"])
            out += decode_specs(a["heads"], a["kv_heads"], a["head_dim"], a["dtype"], a["page_size"], splits, arch,
                                batch=bsz, label="bench_attention decode", benchmark=True)
    return out


def all_specs(archs: tuple[int, ...] = ARCHS, bench_only: bool = False) -> list[CompileSpec]:
    """Every (kernel, configuration) the check compiles, before de-duplication."""
    specs: list[CompileSpec] = []
    for arch in archs:
        specs += _bench_specs(arch)
        for n_seeds in (1, 2):
            specs += zo_update_specs(4096 * 4096, n_seeds, arch, label="zo_update", benchmark=True)
        for seed in (SEED64, SEED32):
            specs += randn_specs(4096 * 4096, seed, arch, label="randn_triton")
        if bench_only:
            continue
        for name, (hidden, inter, heads, kv_heads) in MODELS.items():
            for dtype in DTYPES:
                for m in ROWS:
                    for n, k in ((hidden, hidden), (inter, hidden), (hidden, inter)):
                        for r, wnoise, w32 in LINEAR_MODES:
                            w_dtype = torch.float32 if w32 else dtype
                            specs += noisy_linear_specs(m, n, k, r, dtype, w_dtype, wnoise, arch, SEED64,
                                                        label=f"{name} linear")
        for dtype in DTYPES:
            for head_dim in (64, 128):
                for group in range(1, 9):
                    for page in (1, 16, 64):
                        specs += extend_specs(8 * group, 8, head_dim, dtype, page, arch, label="attention matrix")
                        specs += decode_specs(8 * group, 8, head_dim, dtype, page, 2, arch,
                                              label="attention matrix")
                for splits in range(1, 65):  # every split count choose_num_kv_splits can return
                    specs += decode_specs(32, 8, head_dim, dtype, 16, splits, arch, label="decode splits")[1:]
        for name, (hidden, inter, heads, kv_heads) in MODELS.items():
            d = hidden // heads
            for dtype in DTYPES:
                for page in (1, 16, 64):
                    specs += extend_specs(heads, kv_heads, d, dtype, page, arch, label=f"{name} attention")
                    for bsz in DECODE_BATCHES:
                        for ctx in DECODE_CONTEXTS:
                            splits = choose_num_kv_splits(ctx, bsz, kv_heads)
                            specs += decode_specs(heads, kv_heads, d, dtype, page, splits, arch, batch=bsz,
                                                  label=f"{name} attention")
    return specs


def run(archs: tuple[int, ...], jobs: int, bench_only: bool = False) -> tuple[list[dict], dict]:
    start, load_before = time.perf_counter(), loadavg()
    requested = all_specs(archs, bench_only)
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
                      f"{sum(1 for r in sel if r['wgmma'])}/{len(sel)}", f"{sum(1 for r in sel if r['mma'])}/{len(sel)}"])
    return [f"### sm_{arch}: per kernel", "", *md_table(table, [
        "kernel", "configurations", "launcher cases", "max regs", "max stack B", "spill stores B (max)",
        "configs that spill", "max shared KiB", "wgmma", "mma"]), ""]


def _md(rows: list[dict], s: dict, problems: list[str]) -> str:
    lines = [f"{s['launcher_cases']} launcher cases -> {s['configurations']} distinct compiles for "
             f"sm_{' / sm_'.join(map(str, s['archs']))} in {s['wall_s']} s wall with {s['jobs']} processes "
             f"on {s['cpus']} CPUs (1-minute load average {s['loadavg_1m'][0]} before, {s['loadavg_1m'][1]} after; "
             f"{s['compile_s_sum']} s summed compile time). Tests: `tests/test_aot_compile.py` runs the same.", "",
             "Matrix: the benchmarks' shapes (bench/bench_kernels.py, bench/bench_attention.py) and the "
             "SmolLM2-135M / LLaMA-1B / LLaMA-8B shapes; token rows 1-4096; dtype fp32/bf16/fp16 (fp32 "
             "weights under 16-bit activations too); LoRA r 8/64; full-weight noise on/off; head_dim 64/128; "
             "GQA groups 1-8; page sizes 1/16/64; every split count the decode launcher chooses; 64-bit seeds "
             "(32-bit too at the benchmark shapes). Cases that Triton would specialize identically are "
             "compiled once (the row's `cases` / `covers` in the JSON name them).", "",
             "Registers, stack frame and spills from the wheel's `ptxas -v` (the flags Triton's own compile "
             "uses); shared memory from the compiled kernel's metadata (limit: sm_90 227 KiB, sm_80 163 KiB "
             "per block); wgmma / mma: tensor-core instructions in the PTX. **bench** marks the "
             "configurations the GPU benchmarks run. Nothing here has run on a GPU.", "",
             "Why some dots are not wgmma on sm_90:", "",
             "- `_decode_split_kernel` (16-bit): its dots have BLOCK_H = 16 rows (the padded GQA group), "
             "below wgmma's 64-row minimum, so Triton emits mma.sync; decode is bandwidth-bound, not MMA-bound.",
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
