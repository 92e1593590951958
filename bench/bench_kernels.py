"""Noisy LoRA linear at LLaMA-7B shapes: plain matmul vs unfused torch MeZO vs the fused Triton kernel.

    python bench/bench_kernels.py               # GPU: M=8192 K=N=4096 bf16, r 8 and 64
    python bench/bench_kernels.py --quick       # anywhere: tiny shapes, (a) and (b) on the torch path

Rows a MeZO step pushes through one projection: M = 2 branches x 16 sequences x 256 tokens, half at
θ + εZ and half at θ − εZ. (b) is what one writes without the kernel: materialize Z_A and Z_B, build
A ± εZ_A and B ± εZ_B, one matmul chain per branch. Timing: bench.common.bench_ms (do_bench on GPU).
Results: bench/results/kernels_<device>.{json,md} (--quick: kernels-quick_<device>).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_args, bench_ms, md_table, resolve_device, write_results  # noqa: E402


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
    args = base_args(__doc__).parse_args(argv)  # --quick (implied without CUDA): tiny shapes, the torch path only
    dev = resolve_device(args.device)
    gpu = dev.type == "cuda" and not args.quick
    from kernels import noisy_lora_linear
    from kernels.noise import randn, randn_triton

    if gpu:
        dtype, (m, k, n), ranks, z_raw = torch.bfloat16, (2 * 16 * 256, 4096, 4096), (8, 64), randn_triton
    else:  # CPU bf16 matmuls are too slow to say anything; this checks the script and the torch path
        dtype, (m, k, n), ranks, z_raw = torch.float32, (64, 256, 256), (8,), randn

    def z_gen(seed, shape):
        return z_raw(seed, shape, device=dev)

    eps, scale, impl = 1e-3, 2.0, "triton" if gpu else "torch"
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(m, k, device=dev, generator=gen).to(dtype)
    w = (torch.randn(n, k, device=dev, generator=gen) / k**0.5).to(dtype)
    signs = torch.cat([torch.ones(m // 2), -torch.ones(m - m // 2)]).to(dev)
    flops = 2.0 * m * n * k
    rows: list[dict[str, Any]] = []
    checks: dict[str, float] = {}
    figures: dict[str, float] = {}

    def record(case: str, r: Any, fn: Any) -> float:
        ms = bench_ms(fn, dev)
        rows.append({"case": case, "r": r, "ms": ms, "tflops": flops / ms / 1e9})
        print(f"{case:<34} r={str(r):>4} {ms:9.3f} ms {flops / ms / 1e9:8.2f} TFLOP/s", flush=True)
        return ms

    def compare(cases: tuple[str, str], r: Any, unfused_fn: Any, fused_fn: Any, key: str, check: str) -> None:
        """The unfused torch way vs the fused kernel: times relative to plain (`key` % "fused_over_plain"),
        and the max difference of their outputs (a check, not a figure)."""
        unfused, ms = record(cases[0], r, unfused_fn), record(cases[1], r, fused_fn)
        checks[f"{check}_max_abs_diff_vs_unfused"] = float((fused_fn().float() - unfused_fn().float()).abs().max())
        figures[key % "fused_over_plain"], figures[key % "unfused_over_fused"] = ms / plain, unfused / ms

    plain = record("(a) plain x @ W.T", "-", lambda: x @ w.t())
    for r in ranks:
        a = torch.randn(r, k, device=dev, generator=gen) / k**0.5
        b = torch.randn(n, r, device=dev, generator=gen) * 0.01
        compare(("(b) unfused torch LoRA", f"(c) fused noisy LoRA ({impl})"), r,
                lambda: unfused_lora(x, w, a, b, z_gen, 11, 12, eps, scale),
                lambda: noisy_lora_linear(x, w, a, b, signs=signs, seed_a=11, seed_b=12, eps=eps, scale=scale,
                                          impl=impl), f"%s_r{r}", f"lora_r{r}")
    if gpu:
        compare(("(d) unfused torch full-weight", "(e) fused full-weight (triton)"), "-",
                lambda: unfused_full(x, w, z_gen, 13, eps),
                lambda: noisy_lora_linear(x, w, None, None, signs=signs, seed_a=0, seed_b=0, eps=eps, scale=0.0,
                                          weight_seed=13, impl="triton"), "full_%s", "full")
    dt = str(dtype).replace("torch.", "")
    payload = {"shape": {"M": m, "K": k, "N": n, "dtype": dt}, "quick": not gpu,
               "rows": rows, "checks": checks, "figures": figures}
    md = [f"M={m} K={k} N={n} {dt}" + (" (quick: torch path, not a GPU figure)" if not gpu else ""), "",
          *md_table([[r_["case"], r_["r"], r_["ms"], r_["tflops"]] for r_ in rows], ["case", "r", "ms", "TFLOP/s"]),
          "", *(f"- {k_}: {v:.4g}" for k_, v in {**figures, **checks}.items())]
    write_results("kernels" if gpu else "kernels-quick", payload, "\n".join(md), title="Noisy LoRA linear kernels",
                  device=dev, script=__file__, argv=argv, out_dir=args.out_dir)
    return payload


if __name__ == "__main__":
    run()
