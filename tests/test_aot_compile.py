"""Every Triton kernel compiles for sm_90 and sm_80 on this CPU machine (issue 10, item 3).

One subprocess (TRITON_INTERPRET unset: the kernels must be real JITFunctions) runs
bench/kernels_aot_report.py: each kernel at the configurations its launcher chooses, compiled with
triton.compile(ASTSource, GPUTarget) and measured with the wheel's ptxas; the tests below assert on its
JSON. That is the whole matrix of the issue (benchmark shapes and the SmolLM2 / LLaMA-1B / LLaMA-8B
shapes, fp32/bf16/fp16, r 8/64, full-weight noise on/off, head_dim 64/128, groups 1-8, pages 1/16/64,
every split count, 32- and 64-bit seeds, launches with and without per-row perturbation ids) for sm_90
and sm_80: ~11,800 launcher cases that Triton specializes into 142 distinct compiles (the seeds live in
int64 tables, and P, M, R and the id stride are not specialized, so neither the seed width nor the ids
add a compile), done in a pool of 2 processes (~2-3 minutes on a quiet 2-core machine, see the header
of bench/results/kernels_sm90_resources.md). The committed table comes from the same script.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = ("kernels.lora", "kernels.attention", "kernels.zo_update", "kernels.noise")


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path) and os.path.exists(get_ptxas(80).path)
    except Exception:
        return False


pytestmark = [pytest.mark.aot, pytest.mark.skipif(not _ptxas_available(), reason="Triton's NVIDIA backend "
                                                  "(ptxas) is not installed")]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("aot")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "kernels_aot_report.py"), "--out", str(out), "--jobs", "2"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    path = out / "kernels_sm90_resources.json"
    assert path.exists(), f"report not written (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    data = json.loads(path.read_text())
    assert (out / "kernels_sm90_resources.md").read_text().startswith("# Triton kernels compiled ahead of time")
    return data


def _jit_kernels() -> set[str]:
    """Names of every @triton.jit kernel in the kernel modules (interpreter wrappers in this process)."""
    names = set()
    for mod_name in KERNEL_MODULES:
        mod = importlib.import_module(mod_name)
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and hasattr(obj, "fn") and hasattr(obj, "arg_names"):
                names.add(name)
    return names


def test_every_kernel_compiles_for_both_targets(report):
    rows = report["rows"]
    failed = [f"{r['kernel']} sm_{r['arch']} {r['config']}: {r['error'][-400:]}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    kernels = _jit_kernels()
    assert {"_noisy_linear_kernel", "_lora_down_kernel", "_extend_kernel", "_decode_split_kernel",
            "_decode_merge_kernel", "_zo_update_kernel", "_randn_kernel"} <= kernels
    for arch in (90, 80):
        assert kernels <= {r["kernel"] for r in rows if r["arch"] == arch}, f"a kernel is missing for sm_{arch}"


def _covered(rows: list[dict], kernel: str, name: str) -> set:
    return {v for r in rows if r["kernel"] == kernel for v in r["covers"].get(name, ())}


@pytest.mark.parametrize("arch", [90, 80])
def test_matrix_covers_the_issue(report, arch):
    ok = [r for r in report["rows"] if r["ok"] and r["arch"] == arch]
    lin = [r for r in ok if r["kernel"] == "_noisy_linear_kernel"]
    ptr_types = {tuple(r["signature"][k] for k in ("x_ptr", "w_ptr")) for r in lin}
    assert {("*fp32", "*fp32"), ("*bf16", "*bf16"), ("*fp16", "*fp16"), ("*bf16", "*fp32"), ("*fp16", "*fp32")} <= ptr_types
    modes = {(r["constexprs"]["HAS_LORA"], r["constexprs"]["HAS_WNOISE"]) for r in lin}
    assert {(True, False), (False, True), (True, True)} <= modes
    assert {r["signature"][k] for r in lin for k in ("seed_b_ptr", "seed_w_ptr")} == {"*i64"}  # seed tables
    assert {32, 64} <= _covered(ok, "_noisy_linear_kernel", "seed_bits")  # 64-bit seeds (and 32-bit ones)
    # every noisy-linear compile serves the id-less launch (P = 1) and a launch with ids (P = 4) alike
    for r in ok:
        if r["kernel"] in ("_noisy_linear_kernel", "_lora_down_kernel"):
            assert r["covers"]["perturbations"] == [1, 4], r["config"]
            assert r["signature"]["id_ptr"] == "*i32" and r["signature"]["P"] == "i32"
    assert {8, 64} <= _covered(ok, "_lora_down_kernel", "r") and {16, 64} <= {
        r["constexprs"]["R_PAD"] for r in ok if r["kernel"] == "_lora_down_kernel"}
    assert {1, 16, 64, 4096} <= _covered(ok, "_noisy_linear_kernel", "m")
    assert {2048, 4096} <= _covered(ok, "_noisy_linear_kernel", "k")  # LLaMA-1B and 8B / bench hidden sizes
    for kernel in ("_extend_kernel", "_decode_split_kernel"):
        assert _covered(ok, kernel, "head_dim") == {64, 128}, kernel
        assert set(range(1, 9)) <= _covered(ok, kernel, "group"), kernel
        assert {1, 16, 64} <= _covered(ok, kernel, "page_size"), kernel
        assert _covered(ok, kernel, "dtype") == {"float32", "bfloat16", "float16"}, kernel
    ext = [r for r in ok if r["kernel"] == "_extend_kernel"]
    assert {r["constexprs"]["GROUP_PAD"] for r in ext} == {1, 2, 4, 8}
    assert all(r["constexprs"]["PAGE_POW2"] for r in ext)  # pages 1/16/64 share a kernel (shift + mask)
    assert _chosen_splits() <= _covered(ok, "_decode_merge_kernel", "num_kv_splits")
    assert report["meta"]["launcher_cases"] > 10 * report["meta"]["configurations"]
    from kernels.aot import matrix_specs  # the one enumeration, shared with the report

    assert report["meta"]["launcher_cases"] == len(matrix_specs())


def _chosen_splits() -> set[int]:
    """Every split count choose_num_kv_splits returns (contexts up to 128k, batches 1-256)."""
    from kernels.attention import choose_num_kv_splits

    return {choose_num_kv_splits(ctx, b, kv) for ctx in range(1, 1 << 17, 97) for b in (1, 2, 4, 16, 64, 256)
            for kv in (1, 3, 8)}


def test_benchmark_matrix(report):
    """Even the default run covers both seed widths and both LoRA ranks of the benchmarks."""
    ok = [r for r in report["rows"] if r["ok"] and r["benchmark"]]
    lin = [r for r in ok if r["kernel"] == "_noisy_linear_kernel"]
    assert {32, 64} <= _covered(ok, "_noisy_linear_kernel", "seed_bits")
    assert {1, 4} <= _covered(ok, "_noisy_linear_kernel", "perturbations")
    assert {(True, False), (False, True)} <= {(r["constexprs"]["HAS_LORA"], r["constexprs"]["HAS_WNOISE"]) for r in lin}
    assert {16, 64} <= {r["constexprs"]["R_PAD"] for r in ok if r["kernel"] == "_lora_down_kernel"}
    assert {2, 8, 32} <= _covered(ok, "_decode_merge_kernel", "num_kv_splits")


def test_shared_memory_within_target_limits(report):
    from kernels.aot import SHARED_LIMIT

    assert SHARED_LIMIT == {90: 227 * 1024, 80: 163 * 1024}
    over = [f"{r['kernel']} sm_{r['arch']} {r['config']}: {r['shared']} B" for r in report["rows"]
            if r["ok"] and r["shared"] > SHARED_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)
    assert max(r["shared"] for r in report["rows"] if r["ok"]) > 0


def test_tensor_core_instructions(report):
    """16-bit and tf32x3 dots use wgmma on sm_90 where the tile has >= 64 rows (mma otherwise, and on
    sm_80); the reason for each exception is in the row."""
    rows = [r for r in report["rows"] if r["ok"]]
    missing = [f"{r['kernel']} sm_{r['arch']} {r['config']}: no {r['expected_dot']} ({r['dot_note']})"
               for r in rows if r["expected_dot"] and r[r["expected_dot"]] == 0]
    assert not missing, "\n".join(missing)
    # the benchmarks' matmul loops are Hopper tensor-core loops
    for kernel in ("_noisy_linear_kernel", "_lora_down_kernel", "_extend_kernel"):
        bench = [r for r in rows if r["kernel"] == kernel and r["benchmark"] and r["arch"] == 90]
        assert bench and all(r["wgmma"] > 0 for r in bench), kernel
    assert not any(r["wgmma"] for r in rows if r["arch"] == 80)


@pytest.mark.parametrize("arch", [90, 80])
def test_benchmark_configurations_do_not_spill(report, arch):
    bench = [r for r in report["rows"] if r["ok"] and r["benchmark"] and r["arch"] == arch]
    assert {r["kernel"] for r in bench} >= {"_noisy_linear_kernel", "_lora_down_kernel", "_extend_kernel",
                                           "_decode_split_kernel", "_decode_merge_kernel"}
    spills = [f"{r['kernel']} sm_{r['arch']} {r['config']}: {r['spill_stores']} B" for r in bench if r["spill_stores"]]
    assert not spills, "\n".join(spills)
    assert report["problems"] == []


def test_noise_norm_kernel_compiles():
    """perturbation_norms' kernel (not yet in the report's matrix): compiles for sm_90 and sm_80, no spills."""
    code = ("import json; from kernels.aot import noise_norm_specs, compile_spec; "
            "print(json.dumps([[s.arch, compile_spec(s).spill_stores] for a in (90, 80) for s in noise_norm_specs(a)]))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [[90, 0], [80, 0]]
