"""Fused noisy LoRA linear (DESIGN.md section 5): every perturbation of a launch in one pass over W,
noise never stored.

Per row i with sign σ_i ∈ {+1, -1, 0} and perturbation id p_i (ε_p and the seeds of Z_{A,p}, Z_{B,p},
Z_{W,p} from per-launch tables; without ids every row is p = 0):

    t_i = x_i Aᵀ + σ_i ε_{p_i} x_i Z_{A,p_i}ᵀ
    y_i = x_i Wᵀ + bias + s · (t_i Bᵀ + σ_i ε_{p_i} t_i Z_{B,p_i}ᵀ)   [+ σ_i ε_{p_i} x_i Z_{W,p_i}ᵀ in full-weight mode]

Kernel 1 reduces x against A and Z_A ([M, r] each, tiny). Kernel 2 is a tiled x Wᵀ whose epilogue adds
the LoRA term, R_CHUNK ranks at a time (B and Z_B tiles are [R_CHUNK, BLOCK_N]). Every noise tile comes
from ``tl.randn(seed_p, flat index)`` inside the kernel, once per program for each id p present among
its σ != 0 rows (the id loop walks those ids in increasing order: a program whose rows all have σ = 0
draws no noise at all). Rows of different ids are disjoint, so one accumulator collects x_i Z_{p_i}ᵀ for
all rows (rows of other ids enter a tile's dot as zeros) and the per-row scale σ_i ε_{p_i} multiplies
rows after the dot (or t before the Z_B dot), never the noise tile: rows of both branches, of several
perturbations and unperturbed rows share every W tile.
"""
from __future__ import annotations

from typing import Sequence

import torch
from ._triton import tl, triton  # a stand-in when Triton is not installed

from .launch_config import lora_down_config, noisy_linear_config, target_of
from .lora_ref import Eps, Seeds, lora_noise, noisy_lora_linear_ref
from .lora_tables import perturbation_tables, row_ids

__all__ = ["noisy_lora_linear", "noisy_lora_linear_ref", "lora_noise"]

# float32 dots (LoRA factors, noise, fp32 inputs) on tensor cores at ~fp32 accuracy. Plain "tf32" would
# round t = xAᵀ ± εxZ_Aᵀ to 10 mantissa bits and wash out the ε-sized perturbation. The interpreter
# ignores this and multiplies in float32.
F32_DOT_PRECISION = "tf32x3"


@triton.jit
def _row_perturbations(sign_ptr, id_ptr, eps_ptr, rm, M, P, id_stride):
    """Per row: (active = σ != 0 and id in [0, P), id, σ ε_id as float32), and p_lo, the smallest id
    among the active rows (P when none is: the id loops below then run no trip, no noise at all)."""
    m_ok = rm < M
    sign = tl.load(sign_ptr + rm, mask=m_ok, other=0).to(tl.float32)
    ids = tl.load(id_ptr + rm * id_stride, mask=m_ok, other=0)
    active = m_ok & (sign != 0.0) & (ids >= 0) & (ids < P)
    eps = tl.load(eps_ptr + ids, mask=active, other=0.0)
    p_lo = tl.min(tl.where(active, ids, P), axis=0)
    return active, ids, sign * eps, p_lo


@triton.jit
def _down_loop(x_ptr, a_ptr, rm, rr, rows, K, R, sxm, sxk, acc, acc_n, seed, LOAD_A: tl.constexpr,
               NOISE: tl.constexpr, PREC: tl.constexpr, BLOCK_K: tl.constexpr):
    """Over K: acc += x Aᵀ (LOAD_A) and acc_n += x Z_Aᵀ with Z_A = randn(seed, r * K + k) (NOISE), for the
    rows where `rows` holds (x is 0 elsewhere)."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=rows[:, None] & (rk[None, :] < K), other=0.0).to(tl.float32)
        a_idx = rr[None, :] * K + rk[:, None]  # [BLOCK_K, R_PAD]: flat index of A[r, k], also the counter
        if LOAD_A:
            a = tl.load(a_ptr + a_idx, mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
            acc = tl.dot(x, a, acc, input_precision=PREC)
        if NOISE:
            z = tl.randn(seed, a_idx)  # past K it meets x == 0; padded columns are never stored
            acc_n = tl.dot(x, z, acc_n, input_precision=PREC)
    return acc, acc_n


@triton.jit(do_not_specialize=["M", "R", "P", "id_stride"])
def _lora_down_kernel(x_ptr, a_ptr, t_ptr, tn_ptr, sign_ptr, id_ptr, seed_a_ptr, eps_ptr, M, K, R, P, sxm, sxk,
                      id_stride, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                      R_PAD: tl.constexpr):
    """T = x Aᵀ and T_noise[i] = x_i Z_{A,p_i}ᵀ for BLOCK_M rows (only σ != 0 rows are meaningful: the
    linear kernel scales T_noise by σ_i ε_{p_i}); each Z_A tile is generated in registers once per
    perturbation id present among the program's active rows."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    active, ids, se, p_lo = _row_perturbations(sign_ptr, id_ptr, eps_ptr, rm, M, P, id_stride)
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    acc_n = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    p_next = tl.min(tl.where(active & (ids > p_lo), ids, P), axis=0)
    if (p_lo < P) & (p_next >= P):  # one id among the active rows: its Z_A tiles ride in the x Aᵀ loop
        acc, acc_n = _down_loop(x_ptr, a_ptr, rm, rr, m_ok, K, R, sxm, sxk, acc, acc_n, tl.load(seed_a_ptr + p_lo),
                                True, True, PREC, BLOCK_K)
    else:
        acc, acc_n = _down_loop(x_ptr, a_ptr, rm, rr, m_ok, K, R, sxm, sxk, acc, acc_n, 0, True, False, PREC,
                                BLOCK_K)
        # several ids (none: no trip); rows of different ids are disjoint, so one accumulator holds
        # x_i Z_{A,p_i}ᵀ for every row
        p = p_lo
        while p < P:
            acc, acc_n = _down_loop(x_ptr, a_ptr, rm, rr, active & (ids == p), K, R, sxm, sxk, acc, acc_n,
                                    tl.load(seed_a_ptr + p), False, True, PREC, BLOCK_K)
            p = tl.min(tl.where(active & (ids > p), ids, P), axis=0)
    idx = rm[:, None] * R + rr[None, :]
    mask = m_ok[:, None] & (rr[None, :] < R)
    tl.store(t_ptr + idx, acc, mask=mask)
    tl.store(tn_ptr + idx, acc_n, mask=mask)


@triton.jit
def _k_loop(x_ptr, w_ptr, rm, rn, rows, n_ok, K, sxm, sxk, swn, swk, acc, acc_z, seed_w,
            LOAD_W: tl.constexpr, NOISE: tl.constexpr, LOW_PREC: tl.constexpr, PREC: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """Over K: acc += x Wᵀ (LOAD_W) and acc_z += x Z_Wᵀ with Z_W = randn(seed_w, n * K + k) (NOISE), for
    the rows where `rows` holds (x is 0 elsewhere)."""
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < K
        x = tl.load(x_ptr + rm[:, None] * sxm + rk[None, :] * sxk, mask=rows[:, None] & k_ok[None, :], other=0.0)
        if LOAD_W:
            w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=n_ok[None, :] & k_ok[:, None],
                        other=0.0)
            if LOW_PREC:
                acc = tl.dot(x, w, acc)
            else:
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision=PREC)
        if NOISE:
            z = tl.randn(seed_w, rn[None, :] * K + rk[:, None])  # Z_W[n, k] as a [BLOCK_K, BLOCK_N] tile
            if LOW_PREC:
                # x is exact in 16 bits; z = hi + lo keeps ~16 (bf16) / 22 (fp16) bits of z on tensor cores
                z_hi = z.to(x.dtype)
                z_lo = (z - z_hi.to(tl.float32)).to(x.dtype)
                acc_z = tl.dot(x, z_hi, acc_z)
                acc_z = tl.dot(x, z_lo, acc_z)
            else:
                acc_z = tl.dot(x.to(tl.float32), z, acc_z, input_precision=PREC)
    return acc, acc_z


@triton.jit(do_not_specialize=["M", "R", "P", "id_stride"])
def _noisy_linear_kernel(x_ptr, w_ptr, bias_ptr, t_ptr, tn_ptr, b_ptr, sign_ptr, id_ptr, seed_b_ptr, seed_w_ptr,
                         eps_ptr, out_ptr, M, N, K, R, P, sxm, sxk, swn, swk, som, son, id_stride, scale,
                         HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_WNOISE: tl.constexpr,
                         LOW_PREC: tl.constexpr, PREC: tl.constexpr, GROUP_M: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         R_CHUNK: tl.constexpr):
    # grouped tile order: GROUP_M row blocks sweep the N blocks together, so W tiles stay in L2
    pid = tl.program_id(0)
    n_pid_m = tl.cdiv(M, BLOCK_M)
    n_pid_n = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_pid_n)
    first_m = group * GROUP_M
    group_rows = tl.minimum(n_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_pid_n)) % group_rows
    pid_n = (pid % (GROUP_M * n_pid_n)) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    active, ids, se, p_lo = _row_perturbations(sign_ptr, id_ptr, eps_ptr, rm, M, P, id_stride)  # se: σ_i ε_{p_i}
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_WNOISE:
        # acc_z[i] = x_i Z_{W,p_i}ᵀ; the row scale σ_i ε_{p_i} is applied after the loops, so the 16-bit
        # hi/lo split multiplies exact operands
        acc_z = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        p_next = tl.min(tl.where(active & (ids > p_lo), ids, P), axis=0)
        if (p_lo < P) & (p_next >= P):
            # one id among the active rows (always so without ids, and in tiles a scheduler kept to one
            # id): its Z_W tiles ride in the x Wᵀ loop, next to the W loads, as before ids existed; the
            # rows of other ids and σ = 0 rows are scaled by σ ε = 0 afterwards
            acc, acc_z = _k_loop(x_ptr, w_ptr, rm, rn, m_ok, n_ok, K, sxm, sxk, swn, swk, acc, acc_z,
                                 tl.load(seed_w_ptr + p_lo), True, True, LOW_PREC, PREC, BLOCK_K)
        else:
            acc, acc_z = _k_loop(x_ptr, w_ptr, rm, rn, m_ok, n_ok, K, sxm, sxk, swn, swk, acc, acc_z,
                                 0, True, False, LOW_PREC, PREC, BLOCK_K)
            # several ids (or none: no trip): one Z_W tile per (K step, id), rows of other ids masked
            p = p_lo
            while p < P:
                acc, acc_z = _k_loop(x_ptr, w_ptr, rm, rn, active & (ids == p), n_ok, K, sxm, sxk, swn, swk, acc,
                                     acc_z, tl.load(seed_w_ptr + p), False, True, LOW_PREC, PREC, BLOCK_K)
                p = tl.min(tl.where(active & (ids > p), ids, P), axis=0)
        acc += se[:, None] * acc_z
    else:
        acc, unused = _k_loop(x_ptr, w_ptr, rm, rn, m_ok, n_ok, K, sxm, sxk, swn, swk, acc, acc,
                              0, True, False, LOW_PREC, PREC, BLOCK_K)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        # scale * t Bᵀ with t_i = x_i Aᵀ + σ_i ε x_i Z_{A,p_i}ᵀ, accumulated straight into acc, R_CHUNK ranks
        # at a time: the B and Z_B tiles are [R_CHUNK, BLOCK_N], so a large rank costs loop trips, not
        # registers (no spills). se is 0 on σ = 0 rows, whatever tn holds there.
        for r0 in range(0, R, R_CHUNK):
            rr = r0 + tl.arange(0, R_CHUNK)
            t_idx = rm[:, None] * R + rr[None, :]
            t_mask = m_ok[:, None] & (rr[None, :] < R)
            t = tl.load(t_ptr + t_idx, mask=t_mask, other=0.0) + se[:, None] * tl.load(tn_ptr + t_idx, mask=t_mask,
                                                                                        other=0.0)
            t = t * scale
            b_idx = rn[None, :] * R + rr[:, None]  # [R_CHUNK, BLOCK_N]: flat index of B[n, r]
            b = tl.load(b_ptr + b_idx, mask=n_ok[None, :] & (rr[:, None] < R), other=0.0)
            acc = tl.dot(t, b, acc, input_precision=PREC)
            # + σ_i ε_{p_i} t_i Z_{B,p_i}ᵀ: one Z_B tile per id present, rows of other ids zeroed
            ts = t * se[:, None]
            p = p_lo
            while p < P:
                z_b = tl.randn(tl.load(seed_b_ptr + p), b_idx)  # ranks past R meet t == 0
                acc = tl.dot(tl.where((ids == p)[:, None], ts, 0.0), z_b, acc, input_precision=PREC)
                p = tl.min(tl.where(active & (ids > p), ids, P), axis=0)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _noisy_lora_linear_triton(x, weight, lora_a, lora_b, signs, seed_a, seed_b, eps, scale, bias, weight_seed,
                              perturbation_ids):
    k = x.shape[-1]
    n = weight.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    tabs = perturbation_tables(seed_a, seed_b, eps, weight_seed, x.device)
    ids, id_stride = row_ids(perturbation_ids, m, tabs.num, x.device)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    signs = signs.to(x.device).reshape(-1).contiguous()
    if signs.numel() != m:
        raise ValueError(f"signs has {signs.numel()} entries for {m} rows")
    if signs.dtype == torch.bool:
        signs = signs.to(torch.int8)
    target = target_of(x.device)
    has_lora = lora_a is not None
    wnoise = weight_seed is not None
    r = lora_a.shape[0] if has_lora else 0
    t = tn = b = out  # placeholders, never read when HAS_LORA is off
    if has_lora:
        if lora_b is None or lora_a.shape[1] != k or tuple(lora_b.shape) != (n, r):
            raise ValueError(f"LoRA shapes A{tuple(lora_a.shape)} B{tuple(lora_b.shape) if lora_b is not None else None} "
                             f"do not fit x[..., {k}] and W{tuple(weight.shape)}")
        a = lora_a.to(torch.float32).contiguous()
        b = lora_b.to(torch.float32).contiguous()
        t = torch.empty((m, r), dtype=torch.float32, device=x.device)
        tn = torch.empty_like(t)
        dc = lora_down_config(m, k, r, x.dtype, target)
        _lora_down_kernel[dc.grid(m)](
            x2, a, t, tn, signs, ids, tabs.seed_a, tabs.eps, m, k, r, tabs.num, x2.stride(0), x2.stride(1),
            id_stride, PREC=F32_DOT_PRECISION, BLOCK_M=dc.block_m, BLOCK_K=dc.block_k, R_PAD=dc.r_pad,
            num_warps=dc.num_warps, num_stages=dc.num_stages)
    cfg = noisy_linear_config(m, n, k, r, x.dtype, weight.dtype, wnoise, target)
    _noisy_linear_kernel[cfg.grid(m, n)](
        x2, weight, bias if bias is not None else out, t, tn, b, signs, ids, tabs.seed_b, tabs.seed_w, tabs.eps,
        out, m, n, k, max(r, 1), tabs.num, x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1), id_stride, float(scale),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, HAS_WNOISE=wnoise, LOW_PREC=cfg.low_prec,
        PREC=F32_DOT_PRECISION, GROUP_M=cfg.group_m, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, R_CHUNK=cfg.r_chunk, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out.reshape(*lead, n)


def noisy_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor | None,
                      lora_b: torch.Tensor | None, *, signs: torch.Tensor, seed_a: Seeds, seed_b: Seeds,
                      eps: Eps, scale: float, bias: torch.Tensor | None = None,
                      weight_seed: Seeds | None = None, perturbation_ids: torch.Tensor | None = None,
                      rows_by_id: Sequence[torch.Tensor] | None = None, impl: str = "auto") -> torch.Tensor:
    """Linear layer with LoRA where row i runs at θ + σ_i ε_{p_i} Z_{p_i} (σ_i = signs[i] ∈ {-1, 0, +1}).

    x [..., K] (fp32/bf16/fp16), weight [N, K], lora_a [r, K] and lora_b [N, r] (fp32, or both None),
    signs [M] with M = x.numel() // K. Perturbation p has Z_A = randn(seed_a[p], A.shape),
    Z_B = randn(seed_b[p], B.shape), and, when ``weight_seed`` is given (full-parameter mode),
    Z_W = randn(weight_seed[p], W.shape); each of these and ``eps`` is one value or P values.
    ``perturbation_ids`` int [M] picks each row's p (None: all rows p = 0, P must be 1);
    ``rows_by_id`` optionally gives the torch path each p's active rows (see `rows_by_perturbation`;
    the Triton path finds them in the kernel and ignores it).
    Triton path: seeds (int64) and eps (float32) given as tensors on x's device are read in place (no
    copy, no sync: e.g. views of a per-step seed table); host values are packed into one small device
    table, cached by value (see kernels/lora_tables.py). Ids outside [0, P) raise ValueError when the ids
    are a CPU tensor; on the GPU (unchecked, no sync) such rows get no noise.
    Returns [..., N] in x.dtype. impl: "torch" (materialized noise), "triton", or "auto" (triton on CUDA).
    ValueError / TypeError for inconsistent P, row counts, shapes, non-integer ids or an unknown impl.
    """
    if impl == "auto":
        impl = "triton" if x.is_cuda else "torch"
    if impl == "torch":
        return noisy_lora_linear_ref(x, weight, lora_a, lora_b, signs=signs, seed_a=seed_a, seed_b=seed_b,
                                     eps=eps, scale=scale, bias=bias, weight_seed=weight_seed,
                                     perturbation_ids=perturbation_ids, rows_by_id=rows_by_id)
    if impl != "triton":
        raise ValueError(f"unknown impl {impl!r}")
    return _noisy_lora_linear_triton(x, weight, lora_a, lora_b, signs, seed_a, seed_b, eps, scale, bias,
                                     weight_seed, perturbation_ids)
