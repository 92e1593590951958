"""Benchmark the paged attention kernels against SDPA on contiguous tensors (and flash-attn if present).

Decode: batch {1, 16, 64} x context {512, 2048, 8192}; reports time, achieved KV bandwidth (K+V bytes
read / time) and its share of the peak given by --peak-gbps (default 3350 GB/s, H100 SXM).
Extend: cached prefix 1024 + 64 new tokens through the paged kernel vs recomputing prefix + new from
scratch (what an engine without a prefix cache does), plus SDPA over the same 64 queries.

Timing: bench.common.bench_ms — triton.testing.do_bench on a GPU (median, L2 flushed before each
call, otherwise small KV caches sit in L2 and the bandwidth is overstated). Bandwidth is also given as
a share of the measured device-to-device copy bandwidth (the target: >= 60 % at B=64, ctx 2048).
Without CUDA, a tiny --quick configuration runs the torch path only; it checks the script and the
reference, not GPU speed. Results: bench/results/attention[-quick]_<device-slug>.{json,md}.

    python bench/bench_attention.py                 # on a GPU
    python bench/bench_attention.py --quick         # anywhere
"""
from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_args, bench_ms, md_cell, md_table, resolve_device, write_results  # noqa: E402
from kernels.attention import (decode_attention_flash, decode_attention_torch,  # noqa: E402
                               decode_attention_triton, extend_attention_flash,
                               extend_attention_torch, extend_attention_triton, flash_attn_available)

DECODE_BATCHES, DECODE_CONTEXTS, EXTEND_BATCHES = (1, 16, 64), (512, 2048, 8192), (1, 8, 32)


def copy_gbps(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time): the attainable ceiling."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), "cuda")
    return 2 * nbytes / (ms * 1e-3) / 1e9


def paged_copy(k: torch.Tensor, v: torch.Tensor, page_size: int, gen: torch.Generator):
    """Scatter contiguous k/v [B, L, Hkv, D] into randomly permuted pages (page 0 stays null)."""
    bsz, length, hkv, d = k.shape
    pages_per_seq = math.ceil(length / page_size)
    num_pages = 1 + bsz * pages_per_seq
    perm = torch.randperm(num_pages - 1, generator=gen) + 1
    page_table = perm.view(bsz, pages_per_seq).to(torch.int32).to(k.device)
    pad = pages_per_seq * page_size - length
    k_pool = torch.zeros(num_pages, page_size, hkv, d, dtype=k.dtype, device=k.device)
    v_pool = torch.zeros_like(k_pool)
    k_pool[page_table.long()] = F.pad(k, (0, 0, 0, 0, 0, pad)).view(bsz, pages_per_seq, page_size, hkv, d)
    v_pool[page_table.long()] = F.pad(v, (0, 0, 0, 0, 0, pad)).view(bsz, pages_per_seq, page_size, hkv, d)
    return k_pool, v_pool, page_table


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, **kw) -> torch.Tensor:
    """SDPA on [B, H, L, D] with GQA; older builds without enable_gqa get repeated kv heads."""
    try:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    except TypeError:
        rep = q.shape[1] // k.shape[1]
        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                              scale=scale, **kw)


def measure(impls: dict[str, Callable[[], torch.Tensor]], dev: str, error: Callable[[torch.Tensor], float],
            head: dict[str, Any], figures: Callable[[str, float], dict[str, Any]], err_key: str) -> list[dict]:
    """One row per implementation: `head`, its name, median ms, `figures(name, ms)` and the error of
    its fp32 output; each row is printed as it is measured."""
    rows = []
    for name, fn in impls.items():
        ms = bench_ms(fn, dev, min_run_s=0.05)
        rows.append({"kind": head["kind"], "impl": name, **head, "ms": ms, **figures(name, ms),
                     err_key: error(fn().float())})
        print("  ".join(f"{k} {md_cell(v)}" for k, v in rows[-1].items()), flush=True)
    return rows


def build_case(args, dev: str, bsz: int, q_len: int, kv_len: int, gen) -> tuple:
    """q [B, q_len, H, D], k/v [B, kv_len, Hkv, D]; their paged copies (page size --page-size, and 256
    when flash-attn is present, else None); contiguous [B, H, L, D] copies of q, k, v for SDPA."""
    q = torch.randn(bsz, q_len, args.heads, args.head_dim, dtype=args.dtype, device=dev)
    k = torch.randn(bsz, kv_len, args.kv_heads, args.head_dim, dtype=args.dtype, device=dev)
    v = torch.randn_like(k)
    paged256 = paged_copy(k, v, 256, gen) if flash_attn_available() else None
    contiguous = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
    return q, k, v, paged_copy(k, v, args.page_size, gen), paged256, contiguous


def decode_case(args, dev: str, bsz: int, ctx: int, gen) -> list[dict]:
    scale = args.head_dim ** -0.5
    q4, k, v, paged, paged256, (qc, kc, vc) = build_case(args, dev, bsz, 1, ctx, gen)
    q, seq_lens = q4[:, 0], torch.full((bsz,), ctx, dtype=torch.int32, device=dev)
    kv_bytes = 2 * k.numel() * k.element_size()
    impls: dict[str, Callable[[], torch.Tensor]] = {"sdpa_contiguous": lambda: sdpa(qc, kc, vc, scale)[:, :, 0]}
    if dev == "cuda":
        impls["triton_paged"] = lambda: decode_attention_triton(q, *paged, seq_lens, scale, max_seq_len=ctx)
    else:
        impls["torch_paged"] = lambda: decode_attention_torch(q, *paged, seq_lens, scale)
    if paged256 is not None:
        from flash_attn import flash_attn_with_kvcache
        impls["flash_attn_contiguous"] = lambda: flash_attn_with_kvcache(
            q4, k, v, cache_seqlens=seq_lens, softmax_scale=scale)[:, 0]
        impls["flash_attn_paged256"] = lambda: decode_attention_flash(q, *paged256, seq_lens, scale)
    ref = impls["sdpa_contiguous"]().float()   # errors are relative to SDPA on the same inputs

    def figures(name: str, ms: float) -> dict[str, Any]:
        gbps = kv_bytes / (ms * 1e-3) / 1e9
        return {"kv_gbps": gbps, "pct_peak": 100 * gbps / args.peak_gbps if dev == "cuda" else None,
                "pct_copy": 100 * gbps / args.copy_gbps if args.copy_gbps else None}

    return measure(impls, dev, lambda out: (out - ref).abs().max().item(),
                   {"kind": "decode", "batch": bsz, "context": ctx}, figures, "max_abs_err_vs_sdpa")


def extend_case(args, dev: str, bsz: int, prefix: int, new: int, gen) -> list[dict]:
    h, d, scale, total = args.heads, args.head_dim, args.head_dim ** -0.5, prefix + new
    q_all, _, _, paged, paged256, (qc, kc, vc) = build_case(args, dev, bsz, total, total, gen)
    q_new = q_all[:, prefix:].reshape(bsz * new, h, d).contiguous()
    qo = torch.arange(0, bsz * new + 1, new, dtype=torch.int32, device=dev)
    pre = torch.full((bsz,), prefix, dtype=torch.int32, device=dev)
    q_new_c = qc[:, :, prefix:].contiguous()
    # FLOPs actually needed for the new tokens: 2 matmuls x 2 flops over the visible kv.
    flops = 4 * bsz * h * d * sum(prefix + i + 1 for i in range(new))
    ref = extend_attention_torch(q_new.float(), paged[0].float(), paged[1].float(), paged[2], qo, pre, scale)
    impls: dict[str, Callable[[], torch.Tensor]] = {
        "sdpa_recompute_all": lambda: sdpa(qc, kc, vc, scale, is_causal=True)[:, :, prefix:],
    }
    try:
        from torch.nn.attention.bias import causal_lower_right
        mask = causal_lower_right(new, total)
        impls["sdpa_contiguous_new"] = lambda: sdpa(q_new_c, kc, vc, scale, attn_mask=mask)
    except ImportError:
        pass
    if dev == "cuda":
        impls["triton_paged"] = lambda: extend_attention_triton(q_new, *paged, qo, pre, scale, max_extend_len=new)
    else:
        impls["torch_paged"] = lambda: extend_attention_torch(q_new, *paged, qo, pre, scale)
    if paged256 is not None:
        impls["flash_attn_paged256"] = lambda: extend_attention_flash(q_new, *paged256, qo, pre, scale)
    base = {}

    def figures(name: str, ms: float) -> dict[str, Any]:
        base.setdefault("ms", ms)  # sdpa_recompute_all comes first
        return {"tflops_useful": flops / (ms * 1e-3) / 1e12, "speedup_vs_recompute": base["ms"] / ms}

    # SDPA returns [B, H, new, D]: compared as [B*new, H, D]
    flat = lambda out: out.transpose(1, 2).reshape(bsz * new, h, d) if out.dim() == 4 else out  # noqa: E731
    return measure(impls, dev, lambda out: (flat(out) - ref).abs().max().item(),
                   {"kind": "extend", "batch": bsz, "prefix": prefix, "new": new}, figures, "max_abs_err")


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        sel = [r for r in rows if r["kind"] == kind]
        cols = list(sel[0].keys())
        lines += [f"## {kind}", "", *md_table([[r.get(c) for c in cols] for r in sel], cols), ""]
    return "\n".join(lines)


def figures(rows: list[dict]) -> dict[str, float]:
    """The GPU targets' figures: decode B=64 ctx 2048 share of copy bandwidth, extend vs recompute."""
    out = {}
    for r in rows:
        if r["kind"] == "decode" and r["impl"] == "triton_paged" and (r["batch"], r["context"]) == (64, 2048):
            out["decode_b64_ctx2048_pct_copy"] = r["pct_copy"]
        if r["kind"] == "decode" and r["impl"] == "torch_paged":  # --quick: the CPU path's time
            out[f"decode_torch_b{r['batch']}_ctx{r['context']}_ms"] = r["ms"]
        if r["kind"] == "extend" and r["impl"] == "triton_paged":
            out[f"extend_b{r['batch']}_speedup_vs_recompute"] = r["speedup_vs_recompute"]
    ext = [v for k, v in out.items() if k.startswith("extend_")]
    if ext:
        out["extend_min_speedup_vs_recompute"] = min(ext)
    return out


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = base_args(__doc__)  # --quick (implied without CUDA): tiny shapes, the torch path only
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM peak for %% of peak (H100 SXM: 3350)")
    for name, default in (("--heads", 32), ("--kv-heads", 8), ("--head-dim", 128), ("--page-size", 16)):
        ap.add_argument(name, type=int, default=default)
    args = ap.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    smoke, args.copy_gbps = args.quick or resolve_device(args.device).type != "cuda", None
    if smoke:
        args.heads, args.kv_heads, args.head_dim, args.dtype, dev = 4, 2, 64, torch.float32, "cpu"
        print("GPU figures pending: this run exercises the script and the torch path only.")
        decode, (ext_batches, prefix, new) = ((1, 4), (128, 512)), ((1, 2), 64, 16)
    else:
        args.dtype, dev = torch.bfloat16, str(resolve_device(args.device))
        if torch.device(dev).index is not None:  # copy_gbps and every launch below run on the chosen GPU
            torch.cuda.set_device(dev)
        args.copy_gbps = copy_gbps()
        print(f"device: {torch.cuda.get_device_name()}, copy {args.copy_gbps:.0f} GB/s, "
              f"flash-attn: {flash_attn_available()}")
        decode, (ext_batches, prefix, new) = (DECODE_BATCHES, DECODE_CONTEXTS), (EXTEND_BATCHES, 1024, 64)
    rows = []  # one case per call: its tensors die with it
    for bsz, ctx in itertools.product(*decode):
        rows += decode_case(args, dev, bsz, ctx, gen)
    for bsz in ext_batches:
        rows += extend_case(args, dev, bsz, prefix, new, gen)
    meta = {"smoke": smoke, "dtype": str(args.dtype).replace("torch.", ""), "heads": args.heads,
            "kv_heads": args.kv_heads, "head_dim": args.head_dim, "page_size": args.page_size,
            "peak_gbps": args.peak_gbps, "copy_gbps": args.copy_gbps, "flash_attn": flash_attn_available()}
    payload = {"settings": meta, "results": rows, "figures": figures(rows)}
    write_results("attention-quick" if smoke else "attention", payload, _markdown(rows, meta),
                  title="Paged attention kernels", device=dev, script=__file__, argv=argv, out_dir=args.out_dir)
    return payload


if __name__ == "__main__":
    run()
