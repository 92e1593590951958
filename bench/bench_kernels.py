"""Noisy LoRA linear at LLaMA-7B shapes: plain matmul vs unfused torch MeZO vs the fused Triton kernel.

    python bench/bench_kernels.py               # GPU: M=8192 K=N=4096 bf16, r 8 and 64
    python bench/bench_kernels.py --quick       # anywhere: tiny shapes, (a) and (b) on the torch path

Rows a MeZO step pushes through one projection: M = 2 branches x 16 sequences x 256 tokens, half at
θ + εZ and half at θ − εZ. (b) is what one writes without the kernel: materialize Z_A and Z_B, build
A ± εZ_A and B ± εZ_B, one matmul chain per branch. Timing: bench.common.bench_ms (do_bench on GPU).
Results: bench/results/kernels_<device>.{json,md} (--quick: kernels-quick_<device>).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_ms, md_table, resolve_device, write_results  # noqa: E402


def unfused_lora(x, w, a, b, z_gen, seed_a, seed_b, eps, scale):
    """Two branches, each its own matmul chain with materialized A ± εZ_A and B ± εZ_B."""
    z_a, z_b = z_gen(seed_a, a.shape), z_gen(seed_b, b.shape)
    half = x.shape[0] // 2
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    for sign, rows in ((1.0, slice(0, half)), (-1.0, slice(half, None))):
        xs = x[rows]
        t = xs.float() @ (a + sign * eps * z_a).t()
        y[rows] = xs @ w.t() + (scale * (t @ (b + sign * eps * z_b).t())).to(x.dtype)
    return y


def unfused_full(x, w, z_gen, seed_w, eps):
    """Full-parameter MeZO without the kernel: W ± εZ_W materialized per branch."""
    z_w = z_gen(seed_w, w.shape)
    half = x.shape[0] // 2
    y = torch.empty(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
    for sign, rows in ((1.0, slice(0, half)), (-1.0, slice(half, None))):
        y[rows] = x[rows] @ (w.float() + sign * eps * z_w).to(x.dtype).t()
    return y


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", "--cpu-smoke", dest="quick", action="store_true",
                    help="tiny shapes, torch path only (implied without CUDA)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda" and not args.quick
    from kernels import noisy_lora_linear
    from kernels.noise import randn, randn_triton

    if gpu:
        dtype, (m, k, n), ranks = torch.bfloat16, (2 * 16 * 256, 4096, 4096), (8, 64)
        z_raw = randn_triton
    else:  # CPU bf16 matmuls are too slow to say anything; this checks the script and the torch path
        dtype, (m, k, n), ranks = torch.float32, (64, 256, 256), (8,)
        z_raw = randn

    def z_gen(seed, shape):
        return z_raw(seed, shape, device=dev)

    eps, scale = 1e-3, 2.0
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
    w = (torch.randn(n, k, device=dev, generator=gen) / k**0.5).to(dtype)
    signs = torch.cat([torch.ones(m // 2), -torch.ones(m - m // 2)]).to(dev)
    flops = 2.0 * m * n * k
    rows: list[dict[str, Any]] = []
    checks: dict[str, float] = {}

    def record(case: str, r: Any, fn: Any) -> float:
        ms = bench_ms(fn, dev)
        rows.append({"case": case, "r": r, "ms": ms, "tflops": flops / ms / 1e9})
        print(f"{case:<34} r={str(r):>4} {ms:9.3f} ms {flops / ms / 1e9:8.2f} TFLOP/s", flush=True)
        return ms

    plain = record("(a) plain x @ W.T", "-", lambda: x @ w.t())
    figures: dict[str, float] = {}
    for r in ranks:
        a = torch.randn(r, k, device=dev, generator=gen) / k**0.5
        b = torch.randn(n, r, device=dev, generator=gen) * 0.01
        unfused = record("(b) unfused torch LoRA", r, lambda: unfused_lora(x, w, a, b, z_gen, 11, 12, eps, scale))
        impl = "triton" if gpu else "torch"
        fused = lambda: noisy_lora_linear(x, w, a, b, signs=signs, seed_a=11, seed_b=12,  # noqa: E731
                                          eps=eps, scale=scale, impl=impl)
        ms = record(f"(c) fused noisy LoRA ({impl})", r, fused)
        diff = (fused().float() - unfused_lora(x, w, a, b, z_gen, 11, 12, eps, scale).float()).abs().max()
        checks[f"lora_r{r}_max_abs_diff_vs_unfused"] = float(diff)
        figures[f"fused_over_plain_r{r}"] = ms / plain
        figures[f"unfused_over_fused_r{r}"] = unfused / ms
    if gpu:
        unfused = record("(d) unfused torch full-weight", "-", lambda: unfused_full(x, w, z_gen, 13, eps))
        full = lambda: noisy_lora_linear(x, w, None, None, signs=signs, seed_a=0, seed_b=0,  # noqa: E731
                                         eps=eps, scale=0.0, weight_seed=13, impl="triton")
        ms = record("(e) fused full-weight (triton)", "-", full)
        checks["full_max_abs_diff_vs_unfused"] = float((full().float() - unfused_full(x, w, z_gen, 13, eps).float()).abs().max())
        figures["full_fused_over_plain"] = ms / plain
        figures["full_unfused_over_fused"] = unfused / ms
    payload = {"shape": {"M": m, "K": k, "N": n, "dtype": str(dtype).replace("torch.", "")}, "quick": not gpu,
               "rows": rows, "checks": checks, "figures": figures}
    md = [f"M={m} K={k} N={n} {payload['shape']['dtype']}" + (" (quick: torch path, not a GPU figure)" if not gpu else ""),
          "", *md_table([[r_["case"], r_["r"], r_["ms"], r_["tflops"]] for r_ in rows], ["case", "r", "ms", "TFLOP/s"]),
          "", *(f"- {k_}: {v:.4g}" for k_, v in {**figures, **checks}.items())]
    write_results("kernels" if gpu else "kernels-quick", payload, "\n".join(md), title="Noisy LoRA linear kernels",
                  device=dev, script=__file__, argv=argv, out_dir=args.out_dir)
    return payload


if __name__ == "__main__":
    run()
