"""Paged attention: Triton kernels vs the torch reference, and the reference vs a naive loop.

Without CUDA the Triton kernels run in the interpreter (see conftest.py), which is slow, so the
parameters are paired rather than crossed: every head_dim, GQA ratio, page size and prefix shape
appears at least once. Pools are filled with NaN everywhere except the real tokens, so any read of
the null page or of a slot past a sequence's end shows up as NaN in the output.
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels.attention import (choose_num_kv_splits, decode_attention, decode_attention_torch,
                               decode_attention_triton, extend_attention, extend_attention_torch,
                               extend_attention_triton, flash_attn_available)


@pytest.fixture
def device(kernel_device: str) -> str:
    """Kernel tests run where the Triton kernels can: the GPU, else the interpreter on CPU."""
    return kernel_device


CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_paged_kv(kv_lens: list[int], page_size: int, num_kv_heads: int, head_dim: int,
                  dtype: torch.dtype, device: str, seed: int = 0):
    """Scatter each sequence's K/V over randomly permuted pages (never page 0) of a NaN pool.

    Returns (k_pool, v_pool, page_table [B, max_pages] int32 padded with 0 and one spare column,
    per-sequence contiguous K and V [L, Hkv, D]).
    """
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [math.ceil(n / page_size) for n in kv_lens]
    num_pages = 1 + sum(pages_per_seq) + 5                      # null page + spares
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pool = torch.full(shape, float("nan"), dtype=dtype)
    v_pool = torch.full(shape, float("nan"), dtype=dtype)
    page_table = torch.zeros(len(kv_lens), max(pages_per_seq) + 1, dtype=torch.int32)
    ks, vs = [], []
    for b, n in enumerate(kv_lens):
        pages = [perm.pop() for _ in range(pages_per_seq[b])]
        page_table[b, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        for j in range(n):
            k_pool[pages[j // page_size], j % page_size] = k[j]
            v_pool[pages[j // page_size], j % page_size] = v[j]
        ks.append(k.to(device))
        vs.append(v.to(device))
    return k_pool.to(device), v_pool.to(device), page_table.to(device), ks, vs


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: list[int],
                    sm_scale: float) -> torch.Tensor:
    """Per-token, per-head softmax by hand in float64. q [Lq, H, D], k/v [L, Hkv, D]."""
    num_heads, group = q.shape[1], q.shape[1] // k.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, pos in enumerate(q_pos):
        for h in range(num_heads):
            kk = k[: pos + 1, h // group].double().cpu()
            vv = v[: pos + 1, h // group].double().cpu()
            s = (kk @ q[i, h].double().cpu()) * sm_scale
            w = torch.exp(s - s.max())
            out[i, h] = (w / w.sum()) @ vv
    return out


def make_extend(prefix: list[int], ext: list[int], page_size: int, num_kv_heads: int, group: int,
                head_dim: int, dtype: torch.dtype, device: str, seed: int = 0):
    kv_lens = [p + e for p, e in zip(prefix, ext, strict=True)]
    k_pool, v_pool, pt, ks, vs = make_paged_kv(kv_lens, page_size, num_kv_heads, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(sum(ext), num_kv_heads * group, head_dim, generator=gen).to(dtype).to(device)
    qo_indptr = torch.tensor([0] + list(torch.tensor(ext).cumsum(0)), dtype=torch.int32, device=device)
    prefix_t = torch.tensor(prefix, dtype=torch.int32, device=device)
    return q, k_pool, v_pool, pt, qo_indptr, prefix_t, ks, vs


# (head_dim, group, num_kv_heads, page_size, prefix_lens, extend_lens, config)
EXTEND_CASES = [
    (64, 1, 2, 1, [0, 3, 11], [5, 1, 9], None),
    (128, 3, 1, 16, [0, 16, 37], [4, 20, 1], None),
    (64, 4, 2, 64, [0, 64, 150], [3, 40, 2], None),                  # prefix over 2 pages, unaligned
    (128, 8, 1, 16, [5, 33, 0, 48, 9, 0], [7, 2, 16, 1, 0, 0], {"block_m": 2}),  # empty extends
    (64, 3, 2, 64, [130, 1], [6, 33], {"block_n": 16}),              # a tile is part of a page
    (64, 1, 1, 16, [70, 0], [3, 30], {"block_m": 16, "block_n": 64}),  # a tile spans 4 pages
    (128, 1, 2, 16, [0, 200], [150, 70], None),                       # default tiles, 2 query blocks
    (64, 2, 1, 12, [0, 30], [5, 14], {"block_n": 16}),                # page size not a power of two
]
EXTEND_IDS = [f"d{c[0]}-g{c[1]}-ps{c[3]}" for c in EXTEND_CASES]


@pytest.mark.parametrize("case", EXTEND_CASES, ids=EXTEND_IDS)
def test_extend_reference_matches_naive(case, device):
    head_dim, group, hkv, page_size, prefix, ext, _ = case
    q, k_pool, v_pool, pt, qo, pre, ks, vs = make_extend(prefix, ext, page_size, hkv, group, head_dim,
                                                          torch.float32, device)
    scale = head_dim ** -0.5
    out = extend_attention_torch(q, k_pool, v_pool, pt, qo, pre, scale)
    for b in range(len(ext)):
        rows = slice(int(qo[b]), int(qo[b + 1]))
        want = naive_attention(q[rows], ks[b], vs[b], [prefix[b] + i for i in range(ext[b])], scale)
        torch.testing.assert_close(out[rows].double().cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", EXTEND_CASES, ids=EXTEND_IDS)
def test_extend_triton_matches_reference(case, device):
    head_dim, group, hkv, page_size, prefix, ext, config = case
    q, k_pool, v_pool, pt, qo, pre, _, _ = make_extend(prefix, ext, page_size, hkv, group, head_dim,
                                                        torch.float32, device, seed=1)
    scale = head_dim ** -0.5
    want = extend_attention_torch(q, k_pool, v_pool, pt, qo, pre, scale)
    got = extend_attention_triton(q, k_pool, v_pool, pt, qo, pre, scale, config=config)
    assert got.dtype == q.dtype and got.shape == q.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# (head_dim, group, num_kv_heads, page_size, seq_lens, num_kv_splits, config)
DECODE_CASES = [
    (64, 1, 2, 1, [1, 9, 40], None, None),
    (128, 3, 2, 16, [17, 5, 64, 33], 2, None),
    (64, 4, 1, 64, [150, 64, 2], 3, {"block_n": 32}),      # tiles are half a page
    (128, 8, 1, 16, [100, 1], 7, {"block_n": 16}),         # empty splits for the short sequence
    (64, 3, 2, 64, [129, 300], None, {"block_n": 64}),
    (64, 8, 2, 1, [31, 48, 3], 1, None),                   # no split, tile spans 64 pages
    (128, 4, 2, 16, [2000, 700], None, None),              # default: 8 splits of 256
    (64, 2, 1, 12, [40, 7], 2, {"block_n": 16}),           # page size not a power of two
]
DECODE_IDS = [f"d{c[0]}-g{c[1]}-ps{c[3]}-s{c[5]}" for c in DECODE_CASES]


def make_decode(seq_lens, page_size, hkv, group, head_dim, dtype, device, seed=0):
    k_pool, v_pool, pt, ks, vs = make_paged_kv(seq_lens, page_size, hkv, head_dim, dtype, device, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(seq_lens), hkv * group, head_dim, generator=gen).to(dtype).to(device)
    return q, k_pool, v_pool, pt, torch.tensor(seq_lens, dtype=torch.int32, device=device), ks, vs


@pytest.mark.parametrize("case", DECODE_CASES, ids=DECODE_IDS)
def test_decode_reference_matches_naive(case, device):
    head_dim, group, hkv, page_size, seq_lens, _, _ = case
    q, k_pool, v_pool, pt, sl, ks, vs = make_decode(seq_lens, page_size, hkv, group, head_dim,
                                                    torch.float32, device)
    scale = head_dim ** -0.5
    out = decode_attention_torch(q, k_pool, v_pool, pt, sl, scale)
    for b, n in enumerate(seq_lens):
        want = naive_attention(q[b : b + 1], ks[b], vs[b], [n - 1], scale)[0]
        torch.testing.assert_close(out[b].double().cpu(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", DECODE_CASES, ids=DECODE_IDS)
def test_decode_triton_matches_reference(case, device):
    head_dim, group, hkv, page_size, seq_lens, splits, config = case
    q, k_pool, v_pool, pt, sl, _, _ = make_decode(seq_lens, page_size, hkv, group, head_dim,
                                                  torch.float32, device, seed=2)
    scale = head_dim ** -0.5
    want = decode_attention_torch(q, k_pool, v_pool, pt, sl, scale)
    got = decode_attention_triton(q, k_pool, v_pool, pt, sl, scale, num_kv_splits=splits, config=config)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_decode_equals_single_token_extend(device):
    """A decode step is an extend of one token: both paths must agree."""
    seq_lens = [7, 40, 19]
    q, k_pool, v_pool, pt, sl, _, _ = make_decode(seq_lens, 16, 2, 4, 64, torch.float32, device, seed=3)
    qo = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=device)
    scale = 0.125
    ext = extend_attention_triton(q, k_pool, v_pool, pt, qo, sl - 1, scale)
    dec = decode_attention_triton(q, k_pool, v_pool, pt, sl, scale, num_kv_splits=2, config={"block_n": 16})
    torch.testing.assert_close(ext, dec, atol=1e-5, rtol=1e-5)


def test_auto_dispatch_and_validation(device):
    q, k_pool, v_pool, pt, qo, pre, _, _ = make_extend([3, 0], [2, 4], 16, 2, 2, 64, torch.float32, device)
    auto = extend_attention(q, k_pool, v_pool, pt, qo, pre, 0.125)
    ref = extend_attention(q, k_pool, v_pool, pt, qo, pre, 0.125, impl="torch")
    if not CUDA:  # auto means torch on CPU tensors
        assert torch.equal(auto, ref)
    else:
        torch.testing.assert_close(auto, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError):
        extend_attention(q, k_pool, v_pool, pt, qo, pre, 0.125, impl="nope")
    with pytest.raises(ValueError):  # 4 heads over 3 kv heads
        decode_attention_triton(torch.zeros(1, 4, 64), torch.zeros(2, 16, 3, 64), torch.zeros(2, 16, 3, 64),
                                torch.ones(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 0.1)
    with pytest.raises(ValueError):  # Triton needs q and pools in one dtype (torch path casts)
        extend_attention_triton(q.half(), k_pool, v_pool, pt, qo, pre, 0.125)


def test_choose_num_kv_splits():
    assert choose_num_kv_splits(100, 64, 8) == 1          # short context: no split
    assert choose_num_kv_splits(8192, 1, 8) == 32         # long context, tiny batch: split a lot
    assert choose_num_kv_splits(2048, 64, 8) == 2         # batch already fills the GPU
    assert 1 <= choose_num_kv_splits(10 ** 7, 1, 1) <= 64


@pytest.mark.skipif(not CUDA, reason="half-precision kernels are checked on CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,group,page_size", [(64, 1, 1), (128, 4, 16), (128, 8, 64), (64, 3, 16)])
def test_half_precision_cuda(dtype, head_dim, group, page_size):
    prefix, ext = [0, 37, 200], [33, 1, 64]
    q, k_pool, v_pool, pt, qo, pre, _, _ = make_extend(prefix, ext, page_size, 2, group, head_dim, dtype, "cuda")
    scale = head_dim ** -0.5
    f32 = [t.float() for t in (q, k_pool, v_pool)]
    want = extend_attention_torch(f32[0], f32[1], f32[2], pt, qo, pre, scale)
    got = extend_attention(q, k_pool, v_pool, pt, qo, pre, scale, impl="triton")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])
    seq_lens = [1, 300, 1025]
    q, k_pool, v_pool, pt, sl, _, _ = make_decode(seq_lens, page_size, 2, group, head_dim, dtype, "cuda")
    f32 = [t.float() for t in (q, k_pool, v_pool)]
    want = decode_attention_torch(f32[0], f32[1], f32[2], pt, sl, scale)
    got = decode_attention(q, k_pool, v_pool, pt, sl, scale, impl="triton")
    torch.testing.assert_close(got.float(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not (CUDA and flash_attn_available()), reason="needs flash-attn on CUDA")
def test_flash_attn_backend():
    q, k_pool, v_pool, pt, qo, pre, _, _ = make_extend([300, 0], [5, 40], 256, 2, 4, 128, torch.bfloat16, "cuda")
    scale = 128 ** -0.5
    f32 = [t.float() for t in (q, k_pool, v_pool)]
    want = extend_attention_torch(f32[0], f32[1], f32[2], pt, qo, pre, scale)
    got = extend_attention(q, k_pool, v_pool, pt, qo, pre, scale, impl="flash_attn")
    torch.testing.assert_close(got.float(), want, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
    sl = pre + (qo[1:] - qo[:-1])
    qd = q[qo[1:].long() - 1]
    want = decode_attention_torch(qd.float(), f32[1], f32[2], pt, sl, scale)
    got = decode_attention(qd, k_pool, v_pool, pt, sl, scale, impl="flash_attn")
    torch.testing.assert_close(got.float(), want, atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])
