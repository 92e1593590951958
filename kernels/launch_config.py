"""Launch configurations of the Triton kernels: one pure function per launcher.

Each function maps (shapes, dtypes, target) to a frozen dataclass of block sizes, warps and stages.
The launchers call it, and so does the ahead-of-time compile check (kernels/aot.py,
tests/test_aot_compile.py), so the check compiles exactly what runs.

Targets: the Triton interpreter (CPU; fewer, bigger tiles are much faster there) and CUDA by compute
capability (90 = sm_90, 80 = sm_80). The CUDA tiles are chosen so that no configuration of the AOT
matrix spills registers on sm_90 or sm_80 (see bench/results/kernels_sm90_resources.md), and from few
variants, so that the whole matrix compiles in CI: two row buckets for the noisy linear, one for the
LoRA down kernel, one decode merge width. The kernels mark row counts, ranks, seeds, split counts, GQA
group sizes and page sizes `do_not_specialize`: their values would only multiply the compiled variants
(M == 1, 16-divisibility), not speed anything up (power-of-two page sizes use a runtime shift and mask,
as cheap as a constexpr page size in the SASS).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["LaunchTarget", "INTERPRETER", "cuda_target", "target_of", "next_pow2", "NoisyLinearConfig",
           "noisy_linear_config", "LoraDownConfig", "lora_down_config", "ExtendConfig", "extend_attention_config",
           "DecodeConfig", "decode_attention_config", "ElementwiseConfig", "zo_update_config", "randn_config",
           "NoiseNormConfig", "noise_norm_config"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LaunchTarget:
    """Where a kernel runs: backend "interpreter" (arch 0) or "cuda" with arch = 10*major + minor."""

    backend: str
    arch: int = 0

    def __post_init__(self) -> None:
        if self.backend not in ("interpreter", "cuda"):
            raise ValueError(f"LaunchTarget.backend must be 'interpreter' or 'cuda', got {self.backend!r}")
        if self.backend == "cuda" and self.arch < 70:
            raise ValueError(f"LaunchTarget.arch must be a CUDA compute capability >= 70, got {self.arch}")

    @property
    def is_cuda(self) -> bool:
        return self.backend == "cuda"


INTERPRETER = LaunchTarget("interpreter")


def cuda_target(arch: int) -> LaunchTarget:
    return LaunchTarget("cuda", int(arch))


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def target_of(device: torch.device) -> LaunchTarget:
    """The target a kernel launched on tensors of `device` compiles for."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return INTERPRETER
    return cuda_target(_cuda_arch(device.index if device.index is not None else torch.cuda.current_device()))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, next_pow2(max(1, n))))


def _check_dtype(name: str, dtype: torch.dtype) -> None:
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


# ---- noisy LoRA linear (kernels/lora.py) ----------------------------------------------------------

@dataclass(frozen=True)
class LoraDownConfig:
    """_lora_down_kernel: BLOCK_M rows per program, K walked in BLOCK_K steps, r padded to R_PAD."""

    block_m: int
    block_k: int
    r_pad: int
    num_warps: int
    num_stages: int

    def grid(self, m: int) -> tuple[int]:
        return (-(-m // self.block_m),)


def lora_r_pad(r: int) -> int:
    """LoRA rank padded to a power of two >= 16 (tl.dot needs N >= 16)."""
    return _pow2(r, 16, 1 << 30)


def lora_down_config(m: int, k: int, r: int, x_dtype: torch.dtype, target: LaunchTarget) -> LoraDownConfig:
    """x [m, k] (x_dtype) against A and Z_A [r, k] (fp32): both dots are fp32 (tf32x3 on CUDA)."""
    _check_positive(m=m, k=k, r=r)
    _check_dtype("x_dtype", x_dtype)
    r_pad = lora_r_pad(r)
    if not target.is_cuda:
        return LoraDownConfig(_pow2(m, 16, 128), 256, r_pad, 4, 3)
    # Per program: the x, A and Z_A tiles (Philox state for every Z_A element), two [BLOCK_M, R_PAD]
    # fp32 accumulators, and tf32x3 keeps hi/lo halves of each operand. On sm_90 BLOCK_K 64 spilled
    # at r 16 (108 B) and r 64 (2.7 KB); a BLOCK_K x R_PAD noise tile of <= 1024 elements does not.
    block_k = max(16, min(64, 512 // r_pad))
    if target.arch < 90:
        # sm_80 (mma.sync operands in registers): with the per-row perturbation ids, fp32 x at r <= 16
        # and BLOCK_K 32 spilled 20 B (128 registers); BLOCK_K 16 does not (116)
        block_k = max(16, min(64, 256 // r_pad))
    # BLOCK_M fixed at 64 (one Hopper warpgroup MMA): smaller row tiles would only add compiled
    # variants; x is tiny next to the noise tile, so padding rows costs nothing measurable.
    return LoraDownConfig(64, block_k, r_pad, 8 if r_pad >= 128 else 4, 3)


@dataclass(frozen=True)
class NoisyLinearConfig:
    """_noisy_linear_kernel: [BLOCK_M, BLOCK_N] output tiles, K in BLOCK_K steps, GROUP_M row blocks
    per L2 group, the LoRA epilogue R_CHUNK ranks at a time. low_prec: x and W are both 16-bit (plain
    tensor-core dot); otherwise fp32 tf32x3."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    r_chunk: int
    low_prec: bool
    num_warps: int
    num_stages: int

    def grid(self, m: int, n: int) -> tuple[int]:
        return (-(-m // self.block_m) * -(-n // self.block_n),)


def noisy_linear_config(m: int, n: int, k: int, r: int, x_dtype: torch.dtype, w_dtype: torch.dtype,
                        full_weight_noise: bool, target: LaunchTarget) -> NoisyLinearConfig:
    """y = x Wᵀ (+ noisy LoRA epilogue when r > 0) (+ x Z_Wᵀ when full_weight_noise) for x [m, k],
    W [n, k]. r = 0 means no LoRA. Raises ValueError / TypeError on negative sizes or other dtypes."""
    _check_positive(m=m, n=n, k=k, r=r)
    _check_dtype("x_dtype", x_dtype)
    _check_dtype("w_dtype", w_dtype)
    low = x_dtype in _LOW_PRECISION and w_dtype == x_dtype
    bm = _pow2(m, 16, 128)
    if not target.is_cuda:  # interpreter: fewer, larger tiles (and one epilogue trip) are much faster
        return NoisyLinearConfig(bm, 128, 128, 8, lora_r_pad(max(r, 1)), low, 8 if bm >= 128 else 4, 3)
    # No spills on sm_90 or sm_80 at any mode (bench/results/kernels_sm90_resources.md). Two row
    # buckets: 64 (<= 64 token rows: decode and short prompts, where reading W bounds the time and 64
    # rows is the smallest Hopper warpgroup MMA) and 128; smaller row tiles would only multiply the
    # compiled variants. fp32 tf32x3 dots (3 MMAs on hi/lo halves) need BLOCK_K 16 next to a noise tile.
    bm = 64 if m <= 64 else 128
    bk = 64 if low else 16
    if target.arch >= 90:
        # BLOCK_N 128 spilled in the LoRA epilogue; 4 warps on 64 rows spilled 36 B with LoRA + W noise
        return NoisyLinearConfig(bm, 64, bk, 8, 16, low, 8, 3)
    # sm_80 (mma.sync fragments live in registers): BLOCK_N 64 spilled 40 B in the LoRA epilogue
    # (BLOCK_K 32: 24 B, 64x64 on 4 warps: 56 B); BLOCK_N 32 does not.
    return NoisyLinearConfig(bm, 32, bk, 8, 16, low, 8 if bm >= 128 else 4, 3)


# ---- paged attention (kernels/attention.py) -------------------------------------------------------

@dataclass(frozen=True)
class ExtendConfig:
    """_extend_kernel: BLOCK_M tokens x GROUP_PAD heads per program, BLOCK_N kv per step."""

    block_m: int
    block_n: int
    block_d: int
    group_pad: int
    num_warps: int
    num_stages: int


def _attention_checks(group: int, head_dim: int, dtype: torch.dtype, page_size: int) -> None:
    _check_dtype("dtype", dtype)
    for name, value in (("group", group), ("head_dim", head_dim), ("page_size", page_size)):
        if int(value) < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def extend_attention_config(group: int, head_dim: int, dtype: torch.dtype, page_size: int,
                            target: LaunchTarget, override: dict | None = None) -> ExtendConfig:
    """Tiles for extend attention with `group` query heads per kv head. `override` may set block_m,
    block_n, num_warps, num_stages (tests, tuning sweeps); tl.dot minimums are enforced after it."""
    _attention_checks(group, head_dim, dtype, page_size)
    group_pad = next_pow2(group)
    block_d = next_pow2(head_dim)
    # ~128 (token, head) rows x 64 kv per tile for 16-bit inputs; fp32 tiles (tests) are halved
    # to stay inside shared memory.
    small = block_d > 128 or dtype.itemsize > 2
    cfg = {"block_m": max(1, (64 if small else 128) // group_pad), "block_n": 32 if small else 64,
           "num_warps": 8 if block_d >= 128 else 4, "num_stages": 2}
    unknown = set(override or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown extend config keys {sorted(unknown)}")
    cfg.update(override or {})
    # GPU tl.dot needs M, N, K >= 16: at least 16 rows and 16 kv per tile.
    cfg["block_m"] = max(cfg["block_m"], 16 // min(group_pad, 16))
    cfg["block_n"] = max(cfg["block_n"], 16)
    return ExtendConfig(block_d=block_d, group_pad=group_pad, **cfg)


@dataclass(frozen=True)
class DecodeConfig:
    """_decode_split_kernel: BLOCK_H heads (padded group) x BLOCK_N kv per step; the merge kernel
    reduces SPLITS_PAD partial results with merge_warps warps."""

    block_n: int
    block_h: int
    block_d: int
    splits_pad: int
    num_warps: int
    num_stages: int
    merge_warps: int


def decode_attention_config(group: int, head_dim: int, dtype: torch.dtype, page_size: int, num_kv_splits: int,
                            target: LaunchTarget, override: dict | None = None) -> DecodeConfig:
    """Tiles for split-KV decode. `override` may set block_n, num_warps, num_stages."""
    _attention_checks(group, head_dim, dtype, page_size)
    if int(num_kv_splits) < 1:
        raise ValueError(f"num_kv_splits must be >= 1, got {num_kv_splits}")
    block_d = next_pow2(head_dim)
    small = block_d > 128 or dtype.itemsize > 2
    cfg = {"block_n": 32 if small else 64, "num_warps": 4, "num_stages": 2}
    unknown = set(override or {}) - set(cfg)
    if unknown:
        raise ValueError(f"unknown decode config keys {sorted(unknown)}")
    cfg.update(override or {})
    cfg["block_n"] = max(cfg["block_n"], 16)
    # CUDA: one merge variant for every split count choose_num_kv_splits returns (<= 64); the merge
    # reads only the used splits, and padded lanes are masked register work in a tiny kernel.
    splits_pad = next_pow2(num_kv_splits)
    if target.is_cuda:
        splits_pad = max(64, splits_pad)
    return DecodeConfig(block_h=max(16, next_pow2(group)), block_d=block_d,
                        splits_pad=splits_pad, merge_warps=4, **cfg)


# ---- element-wise noise kernels (kernels/zo_update.py, kernels/noise.py) --------------------------

@dataclass(frozen=True)
class ElementwiseConfig:
    block: int
    num_warps: int

    def grid(self, numel: int) -> tuple[int]:
        return (-(-numel // self.block),)


def zo_update_config(numel: int, target: LaunchTarget) -> ElementwiseConfig:
    """_zo_update_kernel over a flat fp32 parameter of `numel` elements."""
    _check_positive(numel=numel)
    # sm_90: 4 warps (8 Philox streams per thread across the seed loop) spilled 4 B; 8 warps do not
    return ElementwiseConfig(1024, 8 if target.is_cuda else 4)


def randn_config(numel: int, target: LaunchTarget) -> ElementwiseConfig:
    """_randn_kernel writing `numel` normals."""
    _check_positive(numel=numel)
    return ElementwiseConfig(1024, 4)


@dataclass(frozen=True)
class NoiseNormConfig:
    """_sq_sum_kernel (kernels/noise_norm.py): each program sums randn² over `chunk` consecutive
    counters of one tensor, `block` at a time."""

    block: int
    chunk: int
    num_warps: int


def noise_norm_config(target: LaunchTarget) -> NoiseNormConfig:
    """One program per 64k counters on CUDA (~8k programs for 5e8 noise elements: the float32
    partial of a program sums <= 64 terms per lane); 16k in the interpreter (tests use tiny tensors)."""
    return NoiseNormConfig(1024, 1 << 16, 4) if target.is_cuda else NoiseNormConfig(1024, 1 << 14, 4)
