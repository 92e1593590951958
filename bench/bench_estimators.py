"""The estimators' figures: n perturbations in ONE launch (issue 14), and bf16 vs fp32 sign agreement (issue 11).

Both sides train the same engine weights on the same batch (B classification examples behind a
shared few-shot prompt): "n in one launch" is one `MeZOTrainer.step` with n_spsa = n (2n branches,
one launch per prefix depth, every weight read once per launch); "n separate" is n steps with
n_spsa = 1 (what n perturbations cost before issue 14). Reported: seconds per call, steps/s, and the
ratio of one n-perturbation step to one 1-perturbation step (the issue's target on a GPU: <= 1.5 at
B = 16, n = 4). Timing: `bench.common.bench_seconds`; results: `bench.common.write_results`.

--sign-agreement: does a bf16 engine estimate the same MeZO gradient direction as fp32? For --seeds
step seeds, the projected gradient g = (L+ - L-) / 2eps of one batch is computed by an fp32 engine
and by a bf16 engine over the same weights and adapter (LoRA B made nonzero, so both LoRA factors
matter); the figure is the share of seeds where the signs agree (GPU target >= 0.9).

    python -m bench.bench_estimators --model smollm2-135m          # a real checkpoint, B = 16, n = 4
    python -m bench.bench_estimators --random-config smollm2       # SmolLM2-135M's shape, random weights
    python -m bench.bench_estimators --quick                        # tiny random model (CI smoke test)
    python bench/bench_estimators.py --sign-agreement --random-config 1b --device cuda   # GPU suite
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_seconds, md_table, resolve_standard_args, standard_args, write_results  # noqa: E402
from bench.mezo_workloads import (SCENARIOS, ModelRef, Sizes, build_engine, build_examples,  # noqa: E402
                                  build_hf_model, load_tokenizer)
from engine import Engine  # noqa: E402
from mezo import MeZOConfig, MeZOTrainer  # noqa: E402

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = standard_args(__doc__)
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--n", type=int, default=None, help="perturbations per step (default 4; --quick 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="B (default 16; --quick 2)")
    ap.add_argument("--scenario", default=None, choices=["cls", "cls_16shot"],
                    help="bench_mezo's workload: headlines alone, or behind a shared 16-shot prompt "
                         "(default; --quick cls)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; --quick 1)")
    ap.add_argument("--sign-agreement", action="store_true",
                    help="bf16 vs fp32 sign of g instead (scenario cls, n = 1; --kernels/--mode/--n/--repeats unused)")
    ap.add_argument("--seeds", type=int, default=None, help="--sign-agreement: step seeds (default 64; --quick 4)")
    args = ap.parse_args(argv)
    if args.sign_agreement and args.scenario is None:
        args.scenario = "cls"
    args = resolve_standard_args(args, dict(n=2, batch_size=2, scenario="cls", repeats=1, seeds=4),
                                 dict(n=4, batch_size=16, scenario="cls_16shot", repeats=3, seeds=64))
    if min(args.n, args.batch_size, args.repeats, args.seeds) < 1:
        ap.error("--n, --batch-size, --repeats and --seeds must be >= 1")
    args.device = str(args.device)
    return args


def _workload(args: argparse.Namespace, dtype: str) -> tuple[Any, Any, list]:
    """(transformers model, tokenizer, the scenario's batch) as bench_mezo builds them: BBC headlines
    (behind a shared 16-shot prompt by default), random ids for random configs."""
    tok = load_tokenizer("synthetic" if args.random_config is not None else None)
    examples = build_examples(SCENARIOS[args.scenario], Sizes(batch_size=args.batch_size), tok)
    return build_hf_model(ModelRef(args.model, args.random_config, dtype, args.device)), tok, examples


def sign_agreement(args: argparse.Namespace) -> dict[str, Any]:
    """Share of --seeds step seeds on which the bf16 and the fp32 engine's projected gradients agree in sign."""
    hf, tok, examples = _workload(args, "float32")
    trainers = {dt: build_engine(hf, tok, ModelRef(args.model, args.random_config, dt, args.device),
                                 SCENARIOS[args.scenario], examples) for dt in ("float32", "bfloat16")}
    g = torch.Generator().manual_seed(0)
    lora = {k: (torch.randn(v.shape, generator=g) * 0.02 if "lora_B" in k else v.detach().cpu().clone())
            for k, v in trainers["float32"][0].params.items()}
    eps = trainers["float32"][0].config.eps
    grads: dict[str, list[float]] = {k: [] for k in trainers}
    for dtype, (t, encoded) in trainers.items():
        t.engine.set_trainable(lora)
        for s in range(args.seeds):
            lp, lm = t.branch_losses(encoded, seed=1000 + s)
            grads[dtype].append(float((lp - lm) / (2 * eps)))
    agree = sum((a > 0) == (b > 0) for a, b in zip(grads["float32"], grads["bfloat16"])) / args.seeds
    return {"model": args.model or f"random-{args.random_config}", "batch_size": args.batch_size, "seeds": args.seeds,
            "eps": eps, "projected_grads": grads, "figures": {"bf16_sign_agreement": agree}}


def run(args: argparse.Namespace) -> dict[str, Any]:
    hf, tok, examples = _workload(args, args.dtype)
    engine = Engine.from_hf(hf, tok, dtype=hf.dtype, device=args.device, kernels=args.kernels)
    base = dict(mode=args.mode, eps=1e-3, lr=1e-7, batch_size=args.batch_size, steps=10**6, seed=0)
    one_launch = MeZOTrainer(engine, MeZOConfig(n_spsa=args.n, **base))
    single = MeZOTrainer(engine, MeZOConfig(n_spsa=1, **base))  # same engine and adapter
    encoded = one_launch.encode(examples)

    one_launch.step(encoded), single.step(encoded)  # warm-up: kernel compilation, first-touch allocations
    t_n = bench_seconds(lambda: one_launch.step(encoded), engine.device, repeats=args.repeats)
    t_1 = bench_seconds(lambda: single.step(encoded), engine.device, repeats=args.repeats)
    passes = engine.runner.forward_passes
    one_launch.step(encoded)
    launches = engine.runner.forward_passes - passes
    rows = [[f"{args.n} perturbations, one launch", f"{t_n:.4f}", f"{1 / t_n:.3f}", launches],
            [f"{args.n} separate 1-perturbation steps", f"{args.n * t_1:.4f}", f"{1 / (args.n * t_1):.3f}",
             f"{args.n} x {launches}"]]
    return {"config": {k: v if isinstance(v, (int, float, str, type(None))) else str(v) for k, v in vars(args).items()},
            "device": str(engine.device), "kernels": engine.kernels, "dtype": str(engine.dtype),
            "seconds_n_one_launch": t_n, "seconds_one_perturbation": t_1,
            "cost_ratio_n_vs_1": t_n / t_1, "speedup_vs_separate": args.n * t_1 / t_n,
            "launches_per_step": launches, "table": rows}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        payload = sign_agreement(args) if args.sign_agreement else run(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the smoke test) keeps its own
    if args.sign_agreement:
        md = (f"{payload['model']}, B = {args.batch_size}, eps {payload['eps']}, {args.seeds} seeds: the sign of g "
              f"agrees between bf16 and fp32 on **{payload['figures']['bf16_sign_agreement']:.1%}** of seeds.")
        write_results("sign_agreement" + ("-quick" if args.quick else ""), payload, md, device=args.device,
                      title="MeZO estimator: bf16 vs fp32 sign agreement", script=__file__, argv=argv,
                      out_dir=args.out_dir)
        print(md)
        return payload
    md = "\n".join(md_table(payload["table"], ["", "seconds", "steps/s (n perturbations)", "launches"]))
    md += (f"\n\nOne {args.n}-perturbation step costs {payload['cost_ratio_n_vs_1']:.2f}x a 1-perturbation step "
           f"({payload['speedup_vs_separate']:.2f}x faster than {args.n} separate steps); B = {args.batch_size}, "
           f"scenario {args.scenario}, mode {args.mode}, kernels {payload['kernels']}.\n")
    src = args.model or f"random {args.random_config}"
    json_path, _ = write_results("estimators", payload, md, title=f"n-SPSA in one launch ({src})",
                                 device=args.device, script=__file__, argv=argv, out_dir=args.out_dir,
                                 variant="_quick" if args.quick else
                                 ("" if args.scenario == "cls_16shot" else f"_{args.scenario}"))
    print(md)
    print(f"written: {json_path}")
    return payload


if __name__ == "__main__":
    main()
