"""Ahead-of-time compilation of the Triton kernels for a CUDA target, on a machine without a GPU.

A `CompileSpec` is one kernel at one launch configuration: its arguments exactly as the launcher passes
them (pointers by dtype, integers by a representative value) and the launcher's constexprs, warps and
stages, taken from the pure config functions in kernels/launch_config.py. `compile_spec` compiles it
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``, specializing the
arguments with Triton's own JIT binder (so i32/i64 types, 16-divisibility and ``== 1`` constants are
what a real launch would get), then runs the wheel's ``ptxas -v`` on the PTX for registers, stack
frame and spills.

Relies on Triton internals of 3.9 (``create_function_from_signature``, ``JITFunction._pack_args``);
only this check uses them — the kernels themselves use nothing newer than Triton 3.6. Must run in a
process without ``TRITON_INTERPRET=1`` (the kernels are interpreter wrappers there).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .attention import _dot_precision, _is_pow2, _page_shift, choose_num_kv_splits
from .launch_config import (cuda_target, decode_attention_config, extend_attention_config, lora_down_config,
                            noise_norm_config, noisy_linear_config, randn_config, zo_update_config)

__all__ = ["CompileSpec", "Resources", "compile_spec", "SHARED_LIMIT", "noisy_linear_specs", "extend_specs",
           "decode_specs", "zo_update_specs", "randn_specs", "noise_norm_specs", "specialization_key", "resources_row",
           "Distinct", "dedupe", "compile_all", "expected_dot", "check_rows", "ARCHS", "matrix_specs"]

# Max dynamic shared memory per block (opt-in), bytes: sm_90 227 KiB, sm_80 163 KiB (CUDA guide, table 21).
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.int32: "int32", torch.int64: "int64", torch.int8: "int8"}


def _ptr(dtype: torch.dtype) -> tuple[str, str]:
    return ("ptr", _DTYPE_NAMES[dtype])



@dataclass(frozen=True)
class CompileSpec:
    """One kernel at one launch configuration. args: ("ptr", dtype name) | ("int", value) |
    ("float", value) in the kernel's positional order; label: which case asked for it (report only)."""

    kernel: str                               # "module:function" under kernels/
    args: tuple[tuple[str, Any], ...]
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int
    arch: int
    label: str = field(default="", compare=False)
    benchmark: bool = field(default=False, compare=False)  # a configuration a benchmark runs
    case: tuple[tuple[str, Any], ...] = field(default=(), compare=False)  # the launcher's inputs (report only)

    def describe(self) -> str:
        const = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        types = ",".join(f"{'*' + v if k == 'ptr' else k}" for k, v in self.args if k in ("ptr",))
        return f"{const}, warps={self.num_warps}, stages={self.num_stages} [{types}]"


@dataclass(frozen=True)
class Resources:
    """What ptxas and Triton report for one compiled spec (bytes unless named otherwise)."""

    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: int            # wgmma.mma_async instructions in the PTX (Hopper tensor cores)
    mma: int              # mma.sync instructions (Ampere-style tensor cores)
    signature: dict
    compile_s: float


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_stats(ptx: str, arch: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        # the flags Triton's make_cubin uses, so the numbers are those of the cubin that would run
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(tmp, "k.o")]
        log = subprocess.run(cmd, check=True, capture_output=True, text=True).stderr
    stats = {}
    for key, rx in _PTXAS_RE.items():
        found = rx.findall(log)
        if not found:
            raise RuntimeError(f"ptxas -v output has no {key!r}:\n{log}")
        stats[key] = max(int(v) for v in found)
    return stats


def _cache_dir() -> str:
    from triton import knobs

    path = os.path.join(knobs.cache.dir, "mezo_aot")
    os.makedirs(path, exist_ok=True)
    return path


def _fake_arg(kind: str, value: Any) -> Any:
    if kind == "ptr":  # only the dtype and the (16-byte aligned) address matter to specialization
        return torch.empty(1, dtype=getattr(torch, value))
    return int(value) if kind == "int" else float(value)


@functools.lru_cache(maxsize=None)
def _binder(kernel: str, arch: int):
    """(fn, target, backend, binder) for one kernel and arch; the binder is Triton's JIT argument binder."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    module, name = kernel.split(":")
    fn = getattr(importlib.import_module(f"kernels.{module}"), name)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{kernel} is {type(fn).__name__}, not a JITFunction: unset TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    return fn, target, backend, create_function_from_signature(fn.signature, fn.params, backend)


def _specialize(spec: CompileSpec):
    fn, target, backend, binder = _binder(spec.kernel, spec.arch)
    kwargs = dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
    args = [_fake_arg(kind, value) for kind, value in spec.args]
    bound, specialization, options = binder(*args, **kwargs)
    return fn, target, backend, kwargs, bound, specialization, options


def _bind(spec: CompileSpec):
    """(fn, target, options, signature, constexprs, attrs) exactly as Triton's JIT would build them."""
    fn, target, backend, kwargs, bound, specialization, options = _specialize(spec)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return fn, target, options, signature, constexprs, attrs


def specialization_key(spec: CompileSpec) -> str:
    """Two specs with equal keys compile to the same kernel: Triton's own specialization of every
    argument (type, 16-divisibility, == 1), the constexprs, warps and stages, and the target."""
    _, _, _, _, _, specialization, options = _specialize(spec)
    return repr((spec.kernel, spec.arch, specialization, spec.constexprs, sorted(options.items())))


def compile_spec(spec: CompileSpec) -> Resources:
    """Compile `spec` for sm_<arch>; raises whatever Triton or ptxas raise on failure."""
    import triton
    from triton.compiler import ASTSource

    fn, target, options, signature, constexprs, attrs = _bind(spec)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    compile_s = time.perf_counter() - start
    key = hashlib.sha256(f"{compiled.hash}-{spec.arch}".encode()).hexdigest()
    cached = os.path.join(_cache_dir(), f"{key}.json")
    if os.path.exists(cached):
        with open(cached) as f:
            stats = json.load(f)
    else:
        ptx = compiled.asm["ptx"]
        stats = _ptxas_stats(ptx, spec.arch)
        stats.update(shared=int(compiled.metadata.shared), wgmma=ptx.count("wgmma.mma_async"),
                     mma=len(re.findall(r"\bmma\.sync\b", ptx)))
        with open(cached, "w") as f:
            json.dump(stats, f)
    return Resources(signature=signature, compile_s=round(compile_s, 3), **stats)


def _bits(seed: int) -> int:
    return 32 if -(2**31) <= seed < 2**31 else 64


def _attention_case(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int) -> tuple:
    return (("num_heads", num_heads), ("num_kv_heads", num_kv_heads), ("group", num_heads // num_kv_heads),
            ("head_dim", head_dim), ("dtype", _DTYPE_NAMES[dtype]), ("page_size", page_size))


# ---- spec builders: one per launcher, each asking the launcher's config function --------------------

def noisy_linear_specs(m: int, n: int, k: int, r: int, x_dtype: torch.dtype, w_dtype: torch.dtype,
                       full_weight_noise: bool, arch: int, seed: int, has_bias: bool = False,
                       label: str = "", benchmark: bool = False,
                       perturbations: tuple[int, ...] = (1, 4)) -> list[CompileSpec]:
    """The kernels `noisy_lora_linear(impl="triton")` launches for x [m, k], W [n, k], LoRA rank r
    (0: none): the LoRA down kernel (r > 0) and the noisy linear kernel, once per entry of
    `perturbations`: P = 1 is the id-less call (one zero id read with stride 0), P > 1 a launch with
    per-row ids (stride 1). P, M, R and the id stride are not specialized and the seeds and ε live in
    int64 / float32 tables (`seed` only labels the case), so all of these are one compile."""
    target = cuda_target(arch)
    prec = "tf32x3"  # kernels.lora.F32_DOT_PRECISION
    i64, i32, f32 = torch.int64, torch.int32, torch.float32
    specs = []
    rr = max(r, 1)
    for num_p in perturbations:
        case = (("m", m), ("n", n), ("k", k), ("r", r), ("x_dtype", _DTYPE_NAMES[x_dtype]),
                ("w_dtype", _DTYPE_NAMES[w_dtype]), ("full_weight_noise", full_weight_noise),
                ("seed_bits", _bits(seed)), ("perturbations", num_p))
        id_stride = 0 if num_p == 1 else 1
        if r > 0:
            dc = lora_down_config(m, k, r, x_dtype, target)
            specs.append(CompileSpec(
                "lora:_lora_down_kernel",
                (_ptr(x_dtype), _ptr(f32), _ptr(f32), _ptr(f32), _ptr(f32), _ptr(i32), _ptr(i64), _ptr(f32),
                 ("int", m), ("int", k), ("int", r), ("int", num_p), ("int", k), ("int", 1), ("int", id_stride)),
                (("PREC", prec), ("BLOCK_M", dc.block_m), ("BLOCK_K", dc.block_k), ("R_PAD", dc.r_pad)),
                dc.num_warps, dc.num_stages, arch, label, benchmark, case))
        cfg = noisy_linear_config(m, n, k, r, x_dtype, w_dtype, full_weight_noise, target)
        specs.append(CompileSpec(
            "lora:_noisy_linear_kernel",
            (_ptr(x_dtype), _ptr(w_dtype), _ptr(w_dtype if has_bias else x_dtype), _ptr(f32), _ptr(f32), _ptr(f32),
             _ptr(f32), _ptr(i32), _ptr(i64), _ptr(i64), _ptr(f32), _ptr(x_dtype),
             ("int", m), ("int", n), ("int", k), ("int", rr), ("int", num_p), ("int", k), ("int", 1), ("int", k),
             ("int", 1), ("int", n), ("int", 1), ("int", id_stride), ("float", 2.0)),
            (("HAS_BIAS", has_bias), ("HAS_LORA", r > 0), ("HAS_WNOISE", full_weight_noise),
             ("LOW_PREC", cfg.low_prec), ("PREC", prec), ("GROUP_M", cfg.group_m), ("BLOCK_M", cfg.block_m),
             ("BLOCK_N", cfg.block_n), ("BLOCK_K", cfg.block_k), ("R_CHUNK", cfg.r_chunk)),
            cfg.num_warps, cfg.num_stages, arch, label, benchmark, case))
    return specs


def extend_specs(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int,
                 arch: int, max_pages: int = 256, label: str = "", benchmark: bool = False) -> list[CompileSpec]:
    """The kernel `extend_attention_triton` launches for q [T, H, D] and pools [P, page, Hkv, D]."""
    group = num_heads // num_kv_heads
    cfg = extend_attention_config(group, head_dim, dtype, page_size, cuda_target(arch))
    case = _attention_case(num_heads, num_kv_heads, head_dim, dtype, page_size)
    kp, ks, kh = page_size * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim
    i32 = torch.int32
    return [CompileSpec(
        "attention:_extend_kernel",
        (_ptr(dtype), _ptr(dtype), _ptr(dtype), _ptr(dtype), _ptr(i32), _ptr(i32), _ptr(i32), ("float", 0.18),
         ("int", num_heads * head_dim), ("int", head_dim), ("int", num_heads * head_dim), ("int", head_dim),
         ("int", kp), ("int", ks), ("int", kh), ("int", kp), ("int", ks), ("int", kh), ("int", max_pages),
         ("int", page_size), ("int", _page_shift(page_size)), ("int", group)),
        (("GROUP_PAD", cfg.group_pad), ("HEAD_DIM", head_dim), ("BLOCK_M", cfg.block_m),
         ("BLOCK_N", cfg.block_n), ("BLOCK_D", cfg.block_d), ("PAGE_POW2", _is_pow2(page_size)),
         ("DOT_PRECISION", _dot_precision(dtype))),
        cfg.num_warps, cfg.num_stages, arch, label, benchmark, case)]


def decode_specs(num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, page_size: int,
                 num_kv_splits: int, arch: int, batch: int = 16, max_pages: int = 256, label: str = "",
                 benchmark: bool = False) -> list[CompileSpec]:
    """The two kernels `decode_attention_triton` launches (split, merge) for q [B, H, D]."""
    group = num_heads // num_kv_heads
    cfg = decode_attention_config(group, head_dim, dtype, page_size, num_kv_splits, cuda_target(arch))
    case = _attention_case(num_heads, num_kv_heads, head_dim, dtype, page_size) + (("num_kv_splits", num_kv_splits),)
    kp, ks, kh = page_size * num_kv_heads * head_dim, num_kv_heads * head_dim, head_dim
    f32, i32 = torch.float32, torch.int32
    mo = (num_heads * num_kv_splits * head_dim, num_kv_splits * head_dim, head_dim)  # mid_o strides
    ml = (num_heads * num_kv_splits, num_kv_splits)                                    # mid_lse strides
    split = CompileSpec(
        "attention:_decode_split_kernel",
        (_ptr(dtype), _ptr(dtype), _ptr(dtype), _ptr(i32), _ptr(i32), _ptr(f32), _ptr(f32), ("float", 0.18),
         ("int", num_kv_splits), ("int", num_heads * head_dim), ("int", head_dim),
         ("int", kp), ("int", ks), ("int", kh), ("int", kp), ("int", ks), ("int", kh), ("int", max_pages),
         ("int", page_size), ("int", _page_shift(page_size)), *(("int", s) for s in mo), *(("int", s) for s in ml),
         ("int", group)),
        (("BLOCK_H", cfg.block_h), ("HEAD_DIM", head_dim), ("BLOCK_N", cfg.block_n),
         ("BLOCK_D", cfg.block_d), ("PAGE_POW2", _is_pow2(page_size)), ("DOT_PRECISION", _dot_precision(dtype))),
        cfg.num_warps, cfg.num_stages, arch, label, benchmark, case)
    merge = CompileSpec(
        "attention:_decode_merge_kernel",
        (_ptr(f32), _ptr(f32), _ptr(dtype), _ptr(i32), ("int", num_kv_splits),
         *(("int", s) for s in mo), *(("int", s) for s in ml), ("int", num_heads * head_dim), ("int", head_dim)),
        (("HEAD_DIM", head_dim), ("BLOCK_N", cfg.block_n), ("BLOCK_D", cfg.block_d), ("SPLITS_PAD", cfg.splits_pad)),
        cfg.merge_warps, 3, arch, label, benchmark, case)
    return [split, merge]


def zo_update_specs(numel: int, n_seeds: int, arch: int, label: str = "", benchmark: bool = False) -> list[CompileSpec]:
    """The kernel `zo_update_` launches for a float32 parameter of `numel` elements."""
    cfg = zo_update_config(numel, cuda_target(arch))
    return [CompileSpec(
        "zo_update:_zo_update_kernel",
        (_ptr(torch.float32), _ptr(torch.int64), _ptr(torch.float32), ("int", n_seeds), ("int", numel),
         ("float", 1e-6), ("float", 0.0)),
        (("BLOCK", cfg.block),), cfg.num_warps, 3, arch, label, benchmark, (("numel", numel), ("n_seeds", n_seeds)))]


def randn_specs(numel: int, seed: int, arch: int, label: str = "", benchmark: bool = False) -> list[CompileSpec]:
    """The kernel `randn_triton` launches for `numel` normals."""
    cfg = randn_config(numel, cuda_target(arch))
    return [CompileSpec(
        "noise:_randn_kernel", (_ptr(torch.float32), ("int", seed), ("int", 0), ("int", numel)),
        (("BLOCK", cfg.block),), cfg.num_warps, 3, arch, label, benchmark,
        (("numel", numel), ("seed_bits", _bits(seed))))]


def noise_norm_specs(arch: int, label: str = "", benchmark: bool = False) -> list[CompileSpec]:
    """The kernel `perturbation_norms(impl="triton")` launches (one configuration for every input)."""
    cfg = noise_norm_config(cuda_target(arch))
    return [CompileSpec(
        "noise_norm:_sq_sum_kernel", (_ptr(torch.int64), _ptr(torch.int32), _ptr(torch.int32), _ptr(torch.float32)),
        (("BLOCK", cfg.block),), cfg.num_warps, 3, arch, label, benchmark, (("chunk", cfg.chunk),))]


def resources_row(spec: CompileSpec, res: Resources) -> dict:
    seeds = ",".join(f"{k}:{v}" for k, v in res.signature.items() if k.startswith("seed") and v != "constexpr")
    config = spec.describe() + (f" {{{seeds}}}" if seeds else "")
    return {"kernel": spec.kernel.split(":")[1], "arch": spec.arch, "config": config,
            "cases": spec.label, "benchmark": spec.benchmark, **{k: v for k, v in asdict(res).items()}}


@dataclass
class Distinct:
    """One distinct compile and every launcher case that maps to it."""

    spec: CompileSpec
    labels: list[str] = field(default_factory=list)
    benchmark: bool = False
    cases: int = 0
    covers: dict[str, set] = field(default_factory=dict)  # launcher input -> values seen


def dedupe(specs: list[CompileSpec]) -> list[Distinct]:
    """One entry per distinct specialization (Triton's own argument specialization, constexprs,
    warps/stages, target), in first-seen order."""
    groups: dict[str, Distinct] = {}
    keys: dict[CompileSpec, str] = {}  # equal specs (labels aside) share a key: bind each once
    for spec in specs:
        if spec not in keys:
            keys[spec] = specialization_key(spec)
        d = groups.setdefault(keys[spec], Distinct(spec))
        if spec.label not in d.labels:
            d.labels.append(spec.label)
        d.benchmark |= spec.benchmark
        d.cases += 1
        for name, value in spec.case:
            d.covers.setdefault(name, set()).add(value)
    return list(groups.values())


def _compile_row(spec: CompileSpec) -> dict:
    try:
        return {"ok": True, **resources_row(spec, compile_spec(spec))}
    except Exception as err:  # reported per row; check_rows fails on it
        return {"ok": False, "kernel": spec.kernel.split(":")[1], "arch": spec.arch, "config": spec.describe(),
                "error": f"{type(err).__name__}: {str(err)[-2000:]}"}


def compile_all(unique: list[Distinct], jobs: int) -> list[dict]:
    """Compile each distinct spec in a pool of `jobs` spawned processes; one row per spec (`ok` False
    with the error where a compile failed), with its launcher cases and expected dot instruction."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # the slow (LoRA) compiles first, so that the pool does not end on one long compile
    order = sorted(range(len(unique)), key=lambda i: "lora:" not in unique[i].spec.kernel)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(_compile_row, [unique[i].spec for i in order], chunksize=1)))
    rows = []
    for i, d in enumerate(unique):
        spec, row = d.spec, done[i]
        row.update(cases=", ".join(d.labels), benchmark=d.benchmark, constexprs=dict(spec.constexprs),
                   num_warps=spec.num_warps, num_stages=spec.num_stages, launcher_cases=d.cases,
                   covers={k: sorted(v, key=str) for k, v in d.covers.items()})
        if row["ok"]:
            row["expected_dot"], row["dot_note"] = expected_dot(row)
        rows.append(row)
    return rows


def expected_dot(row: dict) -> tuple[str | None, str]:
    """The instruction a compiled row's dots must use ("wgmma", "mma") or None where there is no
    tensor-core dot, and why (where sm_90 gets mma instead of wgmma the reason is part of the row)."""
    const = row["constexprs"]
    kernel, arch = row["kernel"], row["arch"]
    if kernel in ("_zo_update_kernel", "_randn_kernel", "_decode_merge_kernel", "_sq_sum_kernel"):
        return None, "no matrix multiply"
    if const.get("DOT_PRECISION") == "ieee":
        return None, "fp32 attention uses exact IEEE dots (FMA, no tensor cores) by design"
    rows = {"_noisy_linear_kernel": const.get("BLOCK_M"), "_lora_down_kernel": const.get("BLOCK_M"),
            "_extend_kernel": const.get("BLOCK_M", 0) * const.get("GROUP_PAD", 1),
            "_decode_split_kernel": const.get("BLOCK_H")}[kernel]
    if arch < 90:
        return "mma", "sm_80 tensor cores"
    if rows < 64:
        return "mma", f"dot has {rows} rows; wgmma needs >= 64 (one warpgroup x 64)"
    return "wgmma", "Hopper tensor cores"


def check_rows(rows: list[dict]) -> list[str]:
    """Problems: failed compiles, shared memory over the target's limit, missing tensor-core
    instructions, spill stores at a benchmark configuration (sm_90 or sm_80)."""
    problems = []
    for row in rows:
        name = f"{row['kernel']} sm_{row['arch']} [{row['config']}]"
        if not row["ok"]:
            problems.append(f"{name}: compile failed: {row['error']}")
            continue
        if row["shared"] > SHARED_LIMIT[row["arch"]]:
            problems.append(f"{name}: {row['shared']} B shared memory > {SHARED_LIMIT[row['arch']]} B")
        want, _ = expected_dot(row)
        if want is not None and row[want] == 0:
            problems.append(f"{name}: no {want} instruction in the PTX")
        if row["benchmark"] and row["spill_stores"]:
            problems.append(f"{name}: {row['spill_stores']} B spill stores at a benchmark configuration")
    return problems


# -- the matrix of the check ------------------------------------------------------------------------------
ARCHS = (90, 80)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SEED64, SEED32 = (1 << 40) + 12345, 12345  # seeds >= 2^31 reach the kernels as i64
# (hidden, intermediate, heads, kv heads) of the model shapes the check covers
MODELS = {"smollm2": (576, 1536, 9, 3), "1b": (2048, 8192, 32, 8), "8b": (4096, 14336, 32, 8)}  # SmolLM2-135M, Llama-3.2-1B, Llama-3-8B
# the GPU benchmarks' shapes (bench/bench_kernels.py, bench/bench_attention.py): their rows are marked "benchmark"
BENCH_MKN = (2 * 16 * 256, 4096, 4096)
BENCH_ATTN = dict(heads=32, kv_heads=8, head_dim=128, page_size=16, dtype=torch.bfloat16)
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


def matrix_specs(archs: tuple[int, ...] = ARCHS, bench_only: bool = False) -> list[CompileSpec]:
    """Every (kernel, configuration) of the AOT check (issue 10: bench/kernels_aot_report.py, tests/test_aot_compile.py),
    before de-duplication: the benchmarks' shapes and, unless bench_only, the model-shape matrix."""
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
