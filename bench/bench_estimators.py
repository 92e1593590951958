"""One n-SPSA step with n perturbations in ONE launch vs n single-perturbation steps (issue 14).

Both sides train the same engine weights on the same batch (B classification examples behind a
shared few-shot prompt): "n in one launch" is one `MeZOTrainer.step` with n_spsa = n (2n branches,
one launch per prefix depth, every weight read once per launch); "n separate" is n steps with
n_spsa = 1 (what n perturbations cost before issue 14). Reported: seconds per call, steps/s, and the
ratio of one n-perturbation step to one 1-perturbation step (the issue's target on a GPU: <= 1.5 at
B = 16, n = 4). Timing: `bench.common.bench_seconds`; results: `bench.common.write_results`.

    python -m bench.bench_estimators --model smollm2-135m          # a real checkpoint, B = 16, n = 4
    python -m bench.bench_estimators --random-config smollm2       # SmolLM2-135M's shape, random weights
    python -m bench.bench_estimators --quick                        # tiny random model (CI smoke test)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import bench_seconds, md_table, resolve_standard_args, standard_args, write_results  # noqa: E402
from bench.mezo_workloads import SCENARIOS, ModelRef, Sizes, build_examples, build_hf_model, load_tokenizer  # noqa: E402
from engine import Engine  # noqa: E402
from mezo import MeZOConfig, MeZOTrainer  # noqa: E402

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = standard_args(__doc__)
    ap.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"])
    ap.add_argument("--mode", default="lora", choices=["lora", "full"])
    ap.add_argument("--n", type=int, default=None, help="perturbations per step (default 4; --quick 2)")
    ap.add_argument("--batch-size", type=int, default=None, help="B (default 16; --quick 2)")
    ap.add_argument("--scenario", default=None, choices=["cls", "cls_16shot"],
                    help="bench_mezo's workload: headlines alone, or behind a shared 16-shot prompt (default; --quick cls)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 3; --quick 1)")
    args = resolve_standard_args(ap.parse_args(argv), dict(n=2, batch_size=2, scenario="cls", repeats=1),
                                 dict(n=4, batch_size=16, scenario="cls_16shot", repeats=3))
    if min(args.n, args.batch_size, args.repeats) < 1:
        ap.error("--n, --batch-size and --repeats must be >= 1")
    args.device = str(args.device)
    return args


def _engine(args: argparse.Namespace) -> tuple[Engine, list]:
    """The engine on the model and the scenario's batch (BBC headlines behind a shared 16-shot prompt by
    default; random ids for random configs without SmolLM2's tokenizer), as bench_mezo builds them."""
    ref = ModelRef(args.model, args.random_config, args.dtype, args.device)
    tok = load_tokenizer("synthetic" if args.random_config is not None else None)
    examples = build_examples(SCENARIOS[args.scenario], Sizes(batch_size=args.batch_size), tok)
    engine = Engine.from_hf(build_hf_model(ref), tok, dtype=ref.torch_dtype, device=args.device, kernels=args.kernels)
    return engine, examples


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine, examples = _engine(args)
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
        payload = run(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the smoke test) keeps its own
    md = "\n".join(md_table(payload["table"], ["", "seconds", "steps/s (n perturbations)", "launches"]))
    md += (f"\n\nOne {args.n}-perturbation step costs {payload['cost_ratio_n_vs_1']:.2f}x a 1-perturbation step "
           f"({payload['speedup_vs_separate']:.2f}x faster than {args.n} separate steps); B = {args.batch_size}, "
           f"scenario {args.scenario}, mode {args.mode}, kernels {payload['kernels']}.\n")
    src = args.model or f"random {args.random_config}"
    json_path, _ = write_results("estimators", payload, md, title=f"n-SPSA in one launch ({src})",
                                 device=args.device, script=__file__, argv=argv, out_dir=args.out_dir,
                                 variant="_quick" if args.quick else ("" if args.scenario == "cls_16shot" else f"_{args.scenario}"))
    print(md)
    print(f"written: {json_path}")
    return payload


if __name__ == "__main__":
    main()
