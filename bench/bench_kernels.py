"""Noisy LoRA linear at LLaMA-7B shapes: plain matmul vs unfused torch MeZO vs the fused Triton kernel.

    python bench/bench_kernels.py              # needs CUDA; writes bench/results/kernels_<device>.json/.md
    python bench/bench_kernels.py --cpu-smoke  # no GPU: tiny shapes, (a) and (b) only, nothing saved

Rows a step of MeZO pushes through one projection: M = 2 branches x 16 sequences x 256 tokens, half at
θ + εZ and half at θ − εZ. (b) is what one writes without the kernel: materialize Z_A and Z_B (with
the Triton generator on GPU), build A ± εZ_A and B ± εZ_B, one matmul chain per branch.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import median_ms_cpu, median_ms_cuda  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _timer_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    return median_ms_cuda(fn, warmup, iters)


def _timer_cpu(fn: Callable[[], object], warmup: int, iters: int) -> float:
    return median_ms_cpu(fn, warmup, iters)


def _unfused_lora(x, w, a, b, z_gen, seed_a, seed_b, eps, scale):
    """Two branches, each its own matmul chain with materialized A ± εZ_A and B ± εZ_B."""
    z_a, z_b = z_gen(seed_a, a.shape), z_gen(seed_b, b.shape)
    half = x.shape[0] // 2
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    for sign, rows in ((1.0, slice(0, half)), (-1.0, slice(half, None))):
        xs = x[rows]
        t = xs.float() @ (a + sign * eps * z_a).t()
        y[rows] = xs @ w.t() + (scale * (t @ (b + sign * eps * z_b).t())).to(x.dtype)
    return y


def _unfused_full(x, w, z_gen, seed_w, eps):
    """Full-parameter MeZO without the kernel: W ± εZ_W materialized per branch."""
    z_w = z_gen(seed_w, w.shape)
    half = x.shape[0] // 2
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    for sign, rows in ((1.0, slice(0, half)), (-1.0, slice(half, None))):
        y[rows] = x[rows] @ (w.float() + sign * eps * z_w).to(x.dtype).t()
    return y


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="no GPU: tiny shapes, (a) and (b) only")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--save", action="store_true", help="also save results in --cpu-smoke mode")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    if not cuda and not args.cpu_smoke:
        print("bench_kernels: no CUDA device here; the fused kernel benchmark needs a GPU. "
              "Run with --cpu-smoke to check that the script itself works.")
        return 0
    if cuda:
        from kernels import noisy_lora_linear
        from kernels.noise import randn_triton as z_gen_raw
        device, dtype = "cuda", torch.bfloat16
        m, k, n, ranks = 2 * 16 * 256, 4096, 4096, (8, 64)
        timer = _timer_cuda
        dev_name = torch.cuda.get_device_name()
    else:
        from kernels.noise import randn as z_gen_raw
        noisy_lora_linear = None
        device, dtype = "cpu", torch.float32  # CPU bf16 matmul is too slow to be a meaningful smoke test
        m, k, n, ranks = 64, 256, 256, (8,)
        timer = _timer_cpu
        dev_name = f"cpu-smoke ({platform.processor() or platform.machine()})"
        args.warmup, args.iters = min(args.warmup, 1), min(args.iters, 3)

    def z_gen(seed, shape):
        return z_gen_raw(seed, shape, device=device)

    eps, scale = 1e-3, 2.0
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    w = (torch.randn(n, k, device=device, generator=gen) / k**0.5).to(dtype)
    signs = torch.cat([torch.ones(m // 2), -torch.ones(m - m // 2)]).to(device)
    flops = 2.0 * m * n * k
    rows = []

    def record(name, r, fn):
        ms = timer(fn, args.warmup, args.iters)
        rows.append(dict(case=name, r=r, ms=round(ms, 4), tflops=round(flops / ms / 1e9, 2)))
        print(f"{name:<34} r={str(r):>4}  {ms:9.3f} ms  {flops / ms / 1e9:8.2f} TFLOP/s")

    print(f"device: {dev_name}   M={m} K={k} N={n} dtype={str(dtype).split('.')[-1]}")
    record("(a) plain x @ W.T", "-", lambda: x @ w.t())
    checks = {}
    for r in ranks:
        a = torch.randn(r, k, device=device, generator=gen) / k**0.5
        b = torch.randn(n, r, device=device, generator=gen) * 0.01
        record("(b) unfused torch LoRA", r, lambda: _unfused_lora(x, w, a, b, z_gen, 11, 12, eps, scale))
        if noisy_lora_linear is not None:
            fused = lambda: noisy_lora_linear(x, w, a, b, signs=signs, seed_a=11, seed_b=12,  # noqa: E731
                                              eps=eps, scale=scale, impl="triton")
            record("(c) fused noisy LoRA (triton)", r, fused)
            diff = (fused().float() - _unfused_lora(x, w, a, b, z_gen, 11, 12, eps, scale).float()).abs().max()
            checks[f"lora_r{r}_max_abs_diff_vs_unfused"] = float(diff)
    if noisy_lora_linear is not None:
        record("(d) unfused torch full-weight", "-", lambda: _unfused_full(x, w, z_gen, 13, eps))
        full = lambda: noisy_lora_linear(x, w, None, None, signs=signs, seed_a=0, seed_b=0,  # noqa: E731
                                         eps=eps, scale=0.0, weight_seed=13, impl="triton")
        record("(e) fused full-weight (triton)", "-", full)
        checks["full_max_abs_diff_vs_unfused"] = float((full().float() - _unfused_full(x, w, z_gen, 13, eps).float()).abs().max())
    for key, val in checks.items():
        print(f"check {key}: {val:.4g}")

    if cuda or args.save:
        import triton
        slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
        meta = dict(command="python " + " ".join(sys.argv), device=dev_name, torch=torch.__version__,
                    triton=triton.__version__, date=datetime.datetime.now().isoformat(timespec="seconds"),
                    shape=dict(M=m, K=k, N=n, dtype=str(dtype)), warmup=args.warmup, iters=args.iters,
                    timing="median of torch.cuda.Event intervals" if cuda else "median wall time",
                    host=platform.node() or os.uname().nodename)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"kernels_{slug}.json").write_text(json.dumps(dict(meta=meta, rows=rows, checks=checks), indent=2))
        md = [f"# Noisy LoRA kernels on {dev_name}", "", f"`{meta['command']}` ({meta['date']}, torch "
              f"{meta['torch']}, triton {meta['triton']}); M={m} K={k} N={n} {meta['shape']['dtype']}, "
              f"{meta['timing']}", "", "| case | r | ms | TFLOP/s |", "|---|---|---|---|"]
        md += [f"| {row['case']} | {row['r']} | {row['ms']} | {row['tflops']} |" for row in rows]
        md += [""] + [f"- {key}: {val:.4g}" for key, val in checks.items()]
        (RESULTS / f"kernels_{slug}.md").write_text("\n".join(md) + "\n")
        print(f"saved {RESULTS / f'kernels_{slug}.json'} and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
