"""Paged attention for the engine: extend (prefill against a cached prefix) and decode.

KV contract: per layer `k_pool`/`v_pool` are [num_pages, page_size, Hkv, D]; page 0 is the null page
used as page-table padding; token j of sequence b lives at (page_table[b, j // page_size],
j % page_size). The engine writes the new tokens' K/V before calling in, so attention reads
everything from the pool.

Backends: "triton" (the kernels below), "torch" (kernels.attention_ref, also the engine's CPU path)
and "flash_attn" (optional wrapper, also in kernels.attention_ref). "auto" picks triton on CUDA
tensors and torch otherwise.

Kernel design (both kernels are GQA-aware: one program owns a kv head and ALL query heads that
read it, so each K/V tile is loaded once per group instead of once per query head):
(GROUP, the query heads per kv head, is a runtime argument: only its padded size shapes the tiles, so
groups 3 and 4 share one compiled kernel.)
* extend: grid (sequence, query block, kv head). The program's tile rows are (token, head-in-group)
  pairs flattened into BLOCK_M * GROUP_PAD rows, so a single tl.dot serves the whole group. It walks
  the kv axis in BLOCK_N tiles, resolving each kv position's page through the page table (which makes
  any page size work, whether a tile spans several pages or part of one), with a causal mask and an
  fp32 online softmax in the exp2 domain.
* decode: flash-decoding. Stage 1, grid (sequence, kv head, split), reduces one chunk of the context
  to a normalised partial output plus its log-sum-exp; stage 2, grid (sequence, head), merges the
  splits. Splitting the kv axis is what keeps an H100 busy when batch * kv heads is small.
"""
from __future__ import annotations

import torch
from ._triton import tl, triton  # a stand-in when Triton is not installed
from torch import Tensor

from kernels.attention_ref import (ExtendGroup, ExtendPlan, SdpaPlan, decode_attention_flash,
                                   decode_attention_torch, decode_plan_torch, extend_attention_flash,
                                   extend_attention_torch, extend_groups_torch, extend_plan_torch,
                                   flash_attn_available)
from kernels.launch_config import decode_attention_config, extend_attention_config, target_of

__all__ = [
    "extend_attention", "decode_attention", "extend_attention_torch", "decode_attention_torch",
    "extend_attention_triton", "decode_attention_triton", "flash_attn_available",
    "extend_attention_flash", "decode_attention_flash", "choose_num_kv_splits", "extend_plan_torch", "ExtendPlan",
    "decode_plan_torch", "SdpaPlan", "extend_groups_torch", "ExtendGroup",
]

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(q, K, V, pt_row, offs_n, n_ok, visible, kvh, offs_d, d_ok, m_i, l_i, acc, sm_scale_log2,
                 stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                 page_size, page_shift, PAGE_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step over the KV tile at positions `offs_n`, read through the page table.
    `visible` masks the scores (causality in extend, the sequence's end in decode). Returns the new
    (running max, running sum, accumulator); all in fp32, base-2 exponentials."""
    if PAGE_POW2:  # shift and mask: as cheap as a constexpr page size, one kernel for every power of two
        page_idx = offs_n >> page_shift
        slot = offs_n & (page_size - 1)
    else:
        page_idx = offs_n // page_size
        slot = offs_n % page_size
    page = tl.load(pt_row + page_idx, mask=n_ok, other=0).to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k_off = page * stride_kp + slot * stride_ks + kvh * stride_kh
    k = tl.load(K + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
    qk = tl.where(visible, qk, float("-inf"))
    # Every row sees at least one position of its first tile, so m_new is finite from then on.
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_off = page * stride_vp + slot * stride_vs + kvh * stride_vh
    v = tl.load(V + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit(do_not_specialize=["GROUP", "page_size", "page_shift"])
def _extend_kernel(Q, K, V, Out, PT, QO_INDPTR, PREFIX, sm_scale_log2,
                   stride_qt, stride_qh, stride_ot, stride_oh,
                   stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_ptb,
                   page_size, page_shift,
                   GROUP, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAGE_POW2: tl.constexpr, DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    m_start = tl.program_id(1) * BLOCK_M
    kvh = tl.program_id(2)
    q_start = tl.load(QO_INDPTR + b)
    ext_len = tl.load(QO_INDPTR + b + 1) - q_start
    if m_start >= ext_len:
        return
    prefix = tl.load(PREFIX + b)
    kv_len = prefix + ext_len

    ROWS: tl.constexpr = BLOCK_M * GROUP_PAD
    offs_r = tl.arange(0, ROWS)
    tok = m_start + offs_r // GROUP_PAD          # token index within the sequence's new tokens
    g = offs_r % GROUP_PAD                        # query head within the kv head's group
    head = kvh * GROUP + g
    row_ok = (tok < ext_len) & (g < GROUP)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    q_off = (q_start + tok).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(Q + q_off[:, None] + offs_d[None, :], mask=io_mask, other=0.0)
    q_pos = prefix + tok

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], tl.float32)
    # The last query of this block sits at prefix + m_start + BLOCK_M - 1: nothing past it is visible.
    kv_end = tl.minimum(kv_len, prefix + m_start + BLOCK_M)
    pt_row = PT + b * stride_ptb
    for n_start in range(0, kv_end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_end
        visible = n_ok[None, :] & (offs_n[None, :] <= q_pos[:, None])  # causal over prefix + new tokens
        m_i, l_i, acc = _attend_tile(q, K, V, pt_row, offs_n, n_ok, visible, kvh, offs_d, d_ok, m_i, l_i, acc,
                                     sm_scale_log2, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
                                     stride_vh, page_size, page_shift, PAGE_POW2, DOT_PRECISION)

    out = acc / l_i[:, None]
    o_off = (q_start + tok).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(Out + o_off[:, None] + offs_d[None, :], out.to(Out.dtype.element_ty), mask=io_mask)


@triton.jit(do_not_specialize=["num_splits", "stride_mob", "stride_moh", "stride_mos",
                                     "stride_mlb", "stride_mlh", "GROUP", "page_size",
                                     "page_shift"])
def _decode_split_kernel(Q, K, V, PT, SEQ_LENS, MID_O, MID_LSE, sm_scale_log2, num_splits,
                         stride_qb, stride_qh, stride_kp, stride_ks, stride_kh,
                         stride_vp, stride_vs, stride_vh, stride_ptb, page_size, page_shift,
                         stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                         GROUP, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_POW2: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SEQ_LENS + b)
    # Chunks are whole tiles so that tiles stay aligned to pages whenever BLOCK_N divides page_size.
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    if start >= seq_len:  # short sequence: this split is empty and stage 2 never reads it
        return
    end = tl.minimum(start + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < GROUP
    head = kvh * GROUP + offs_h
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    hd_mask = h_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :], mask=hd_mask, other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    pt_row = PT + b * stride_ptb
    for n_start in range(start, end, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        m_i, l_i, acc = _attend_tile(q, K, V, pt_row, offs_n, n_ok, n_ok[None, :], kvh, offs_d, d_ok, m_i, l_i,
                                     acc, sm_scale_log2, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
                                     stride_vh, page_size, page_shift, PAGE_POW2, DOT_PRECISION)

    mo = MID_O + b * stride_mob + head[:, None] * stride_moh + split * stride_mos + offs_d[None, :]
    tl.store(mo, acc / l_i[:, None], mask=hd_mask)
    tl.store(MID_LSE + b * stride_mlb + head * stride_mlh + split, m_i + tl.log2(l_i), mask=h_ok)


@triton.jit(do_not_specialize=["num_splits", "stride_mob", "stride_moh", "stride_mos",
                                     "stride_mlb", "stride_mlh"])
def _decode_merge_kernel(MID_O, MID_LSE, Out, SEQ_LENS, num_splits,
                         stride_mob, stride_moh, stride_mos, stride_mlb, stride_mlh,
                         stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SEQ_LENS + b)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    n_used = tl.cdiv(seq_len, chunk)
    offs_s = tl.arange(0, SPLITS_PAD)
    s_ok = offs_s < n_used
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(MID_LSE + b * stride_mlb + h * stride_mlh + offs_s, mask=s_ok, other=float("-inf"))
    part = tl.load(MID_O + b * stride_mob + h * stride_moh + offs_s[:, None] * stride_mos + offs_d[None, :],
                   mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    w = tl.exp2(lse - tl.max(lse, 0))              # unused splits get weight exactly 0
    out = tl.sum(w[:, None] * part, 0) / tl.sum(w, 0)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=d_ok)


def _check_pools(q: Tensor, k_pool: Tensor, v_pool: Tensor) -> tuple[int, int, int]:
    """Validate shapes the kernels rely on; return (group, page_size, head_dim)."""
    if k_pool.shape != v_pool.shape or k_pool.dim() != 4:
        raise ValueError(f"k_pool {tuple(k_pool.shape)} / v_pool {tuple(v_pool.shape)} must match [P, page, Hkv, D]")
    num_heads, head_dim = q.shape[-2], q.shape[-1]
    num_kv_heads = k_pool.shape[2]
    if num_heads % num_kv_heads or head_dim != k_pool.shape[3]:
        raise ValueError(f"q heads/dim {num_heads}/{head_dim} incompatible with pool {tuple(k_pool.shape)}")
    if k_pool.dtype != q.dtype or v_pool.dtype != q.dtype:
        raise ValueError(f"Triton attention needs q and the pools in one dtype, got {q.dtype}/{k_pool.dtype}")
    if q.stride(-1) != 1 or k_pool.stride(-1) != 1 or v_pool.stride(-1) != 1:
        raise ValueError("q, k_pool and v_pool need a contiguous last (head_dim) axis")
    return num_heads // num_kv_heads, k_pool.shape[1], head_dim


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _page_shift(page_size: int) -> int:
    """log2(page_size) for a power of two (the kernels then shift and mask), else 0 (unused)."""
    return page_size.bit_length() - 1 if _is_pow2(page_size) else 0


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact IEEE dots (tf32 would break the fp32 tolerances); 16-bit ones ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def extend_attention_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor,
                            qo_indptr: Tensor, prefix_lens: Tensor, sm_scale: float,
                            max_extend_len: int | None = None, config: dict | None = None) -> Tensor:
    """Triton extend attention. `max_extend_len` (if the caller knows it) avoids a host sync;
    `config` overrides block_m / block_n / num_warps / num_stages (tests, tuning sweeps)."""
    group, page_size, head_dim = _check_pools(q, k_pool, v_pool)
    out = torch.empty_like(q)
    bsz = page_table.shape[0]
    if q.shape[0] == 0 or bsz == 0:
        return out
    if max_extend_len is None:
        max_extend_len = int((qo_indptr[1:] - qo_indptr[:-1]).max())
    cfg = extend_attention_config(group, head_dim, q.dtype, page_size, target_of(q.device), config)
    grid = (bsz, triton.cdiv(max_extend_len, cfg.block_m), k_pool.shape[2])
    _extend_kernel[grid](
        q, k_pool, v_pool, out, page_table, qo_indptr, prefix_lens, sm_scale * _LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), page_table.stride(0),
        page_size, _page_shift(page_size),
        GROUP=group, GROUP_PAD=cfg.group_pad, HEAD_DIM=head_dim, BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, PAGE_POW2=_is_pow2(page_size),
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out


def choose_num_kv_splits(max_seq_len: int, batch: int, num_kv_heads: int,
                         min_chunk: int = 256, target_programs: int = 1024, max_splits: int = 64) -> int:
    """Split the context so that stage 1 launches about `target_programs` programs (~8 per H100 SM),
    but never into chunks shorter than `min_chunk` tokens, where the merge costs more than it saves."""
    by_len = triton.cdiv(max(max_seq_len, 1), min_chunk)
    by_occupancy = triton.cdiv(target_programs, max(batch * num_kv_heads, 1))
    return max(1, min(by_len, by_occupancy, max_splits))


def decode_attention_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor,
                            seq_lens: Tensor, sm_scale: float, num_kv_splits: int | None = None,
                            max_seq_len: int | None = None, config: dict | None = None) -> Tensor:
    """Triton split-KV decode. `max_seq_len` (if known) avoids a host sync when choosing splits."""
    group, page_size, head_dim = _check_pools(q, k_pool, v_pool)
    bsz, num_heads = q.shape[0], q.shape[1]
    num_kv_heads = k_pool.shape[2]
    out = torch.empty_like(q)
    if bsz == 0:
        return out
    if num_kv_splits is None:
        if max_seq_len is None:
            max_seq_len = int(seq_lens.max())
        num_kv_splits = choose_num_kv_splits(max_seq_len, bsz, num_kv_heads)
    cfg = decode_attention_config(group, head_dim, q.dtype, page_size, num_kv_splits, target_of(q.device), config)
    mid_o = torch.empty(bsz, num_heads, num_kv_splits, head_dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(bsz, num_heads, num_kv_splits, dtype=torch.float32, device=q.device)
    _decode_split_kernel[(bsz, num_kv_heads, num_kv_splits)](
        q, k_pool, v_pool, page_table, seq_lens, mid_o, mid_lse, sm_scale * _LOG2E, num_kv_splits,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), page_table.stride(0),
        page_size, _page_shift(page_size),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, BLOCK_H=cfg.block_h, HEAD_DIM=head_dim,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, PAGE_POW2=_is_pow2(page_size),
        DOT_PRECISION=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    _decode_merge_kernel[(bsz, num_heads)](
        mid_o, mid_lse, out, seq_lens, num_kv_splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1), HEAD_DIM=head_dim, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        SPLITS_PAD=cfg.splits_pad, num_warps=cfg.merge_warps)
    return out


def _resolve(impl: str, q: Tensor) -> str:
    if impl == "auto":
        return "triton" if q.is_cuda else "torch"
    if impl not in ("torch", "triton", "flash_attn"):
        raise ValueError(f"unknown attention impl {impl!r}")
    return impl


def extend_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor, qo_indptr: Tensor,
                     prefix_lens: Tensor, sm_scale: float, impl: str = "auto", max_extend_len: int | None = None,
                     max_seq_len: int | None = None, plan: ExtendPlan | list[ExtendGroup] | None = None) -> Tensor:
    """New tokens (ragged rows of q, split by qo_indptr) attend causally to their cached prefix and
    to themselves; returns [T, H, D] in q's dtype.

    `max_extend_len` (most new tokens of one sequence) and `max_seq_len` (most prefix + new tokens)
    are host ints the caller knows from building the batch; given, no implementation reads a device
    tensor on the host (no GPU sync). They must be exact upper bounds, or rows are skipped.
    `plan` (torch impl only, ignored by the others): the batch's `extend_plan_torch` or
    `extend_groups_torch`, shared by layers.
    """
    impl = _resolve(impl, q)
    if impl == "triton":
        return extend_attention_triton(q, k_pool, v_pool, page_table, qo_indptr, prefix_lens, sm_scale,
                                       max_extend_len=max_extend_len)
    if impl == "flash_attn":
        return extend_attention_flash(q, k_pool, v_pool, page_table, qo_indptr, prefix_lens, sm_scale,
                                      max_extend_len=max_extend_len)
    return extend_attention_torch(q, k_pool, v_pool, page_table, qo_indptr, prefix_lens, sm_scale,
                                  max_extend_len=max_extend_len, max_seq_len=max_seq_len, plan=plan)


def decode_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, page_table: Tensor, seq_lens: Tensor,
                     sm_scale: float, impl: str = "auto", num_kv_splits: int | None = None,
                     max_seq_len: int | None = None, plan: SdpaPlan | None = None) -> Tensor:
    """One query per sequence (at position seq_lens[b]-1) over its whole paged KV; [B, H, D].
    `max_seq_len` (host int, >= every seq_lens[b]) avoids reading seq_lens on the host.
    `plan` (torch impl only, ignored by the others): the batch's `decode_plan_torch`, shared by layers."""
    impl = _resolve(impl, q)
    if impl == "triton":
        return decode_attention_triton(q, k_pool, v_pool, page_table, seq_lens, sm_scale, num_kv_splits,
                                       max_seq_len=max_seq_len)
    if impl == "flash_attn":
        return decode_attention_flash(q, k_pool, v_pool, page_table, seq_lens, sm_scale)
    return decode_attention_torch(q, k_pool, v_pool, page_table, seq_lens, sm_scale, max_seq_len=max_seq_len,
                                  plan=plan)
