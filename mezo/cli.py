"""`mezo-engine finetune`: MeZO on the built-in defaults or your own data, with a before/after table."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

# The demo's settings come from a recorded sweep on SmolLM2-135M + BBC headlines (README, "MeZO demo").
DEMO_OVERRIDES = {"lr": 1e-3, "eps": 1e-2}


def add_finetune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="built-in name, HF directory or .gguf path")
    p.add_argument("--task", default="bbc_news", help="built-in task name or a JSONL file of training examples")
    p.add_argument("--eval", default=None, help="JSONL of held-out examples (default: the task's test split)")
    p.add_argument("--preset", default="opt-lora", help="MeZOConfig preset (see --list-presets)")
    p.add_argument("--list-presets", action="store_true")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-spsa", type=int, default=None, help="perturbations per step (all in one launch)")
    p.add_argument("--estimator", default=None, choices=["spsa", "one_sided", "per_example"],
                   help="spsa: MeZO's n-SPSA; one_sided: FZOO's batched one-sided estimate; per_example: "
                        "GRZO, one perturbation per example of the batch")
    p.add_argument("--no-group-relative", dest="per_example_group_relative", action="store_false", default=None,
                   help="per_example: plain per-example SPSA instead of GRZO's group-relative (std) scaling")
    p.add_argument("--one-sided-std-scaling", action="store_true", default=None,
                   help="one_sided: divide the step by the std of the perturbed losses (FZOO)")
    p.add_argument("--normalize-perturbations", action="store_true", default=None, help="perturb by z/||z||")
    p.add_argument("--objective", default=None, choices=["classification", "lm", "accuracy", "f1"])
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--demo", action="store_true", help=f"use the demo's tuned settings {DEMO_OVERRIDES}")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/mezo", help="output directory (adapter, metrics, plot, checkpoints)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--dist-backend", default=None, choices=["gloo", "nccl"],
                   help="under torchrun: the torch.distributed backend (default: nccl on CUDA, gloo on CPU)")
    p.add_argument("--shard-balance", default=None, choices=["tokens", "throughput"],
                   help="under torchrun: split each batch by tokens (default, bitwise reproducible) or also by "
                        "each rank's measured tokens/s (faster with uneven ranks; not bit-reproducible)")


def build_config(args: argparse.Namespace):
    from .config import MeZOConfig

    overrides = dict(DEMO_OVERRIDES) if args.demo else {}
    for field in ("steps", "lr", "eps", "batch_size", "n_spsa", "objective", "eval_size", "eval_every",
                  "checkpoint_every", "seed", "estimator", "one_sided_std_scaling", "normalize_perturbations",
                  "per_example_group_relative", "shard_balance"):
        value = getattr(args, field)
        if value is not None:
            overrides[field] = value
    steps = overrides.pop("steps", None)
    config = MeZOConfig.preset(args.preset, **({"steps": steps} if steps is not None else {}))
    return replace(config, **overrides) if overrides else config


def run_finetune(args: argparse.Namespace) -> int:
    from engine import Engine

    from .config import MeZOConfig
    from .distributed import agree, process_group_from_env

    if args.list_presets:
        for name in MeZOConfig.presets():
            print(name, json.dumps(MeZOConfig.preset(name).to_dict()))
        return 0
    config = build_config(args)
    eval_source = args.eval if args.eval is not None else (args.task if not Path(args.task).is_file() else None)
    # under torchrun: join the process group, load the model on every rank (a rank that cannot is named)
    with process_group_from_env(args.device, args.dist_backend) as (ctx, device):
        engine = agree(ctx, lambda: Engine(args.model, dtype=args.dtype, device=device), "loading the model")
        result = engine.finetune(args.task, eval_source, config, out_dir=args.out, progress=not args.no_progress)
        if ctx is None or ctx.is_writer:
            print_summary(result, config, engine)
    return 0


def print_summary(result, config, engine) -> None:
    rows = [("", "before", "after")]
    before, after = result.initial_eval or {}, result.final_eval or {}
    for key in sorted(set(before) | set(after)):
        if key == "n":
            continue
        fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))
        rows.append((f"held-out {key}", fmt(before.get(key, "-")), fmt(after.get(key, "-"))))
    width = max(len(r[0]) for r in rows) + 2
    print()
    for r in rows:
        print(f"{r[0]:<{width}}{r[1]:>10}{r[2]:>10}")
    tokens = sum(h.get("tokens_computed", 0) for h in result.history)
    secs = max(result.seconds, 1e-9)
    print(f"\n{len(result.history)} MeZO steps in {result.seconds:.1f}s: {len(result.history) / secs:.2f} steps/s, "
          f"{tokens / secs:.0f} tokens/s (both branches), lr {config.lr:g}, eps {config.eps:g}, "
          f"batch {config.batch_size}, device {engine.device.type}")
    if result.nonfinite_steps:
        print(f"{result.nonfinite_steps} steps skipped for non-finite loss")
    if result.out_dir:
        print(f"adapter, metrics.jsonl, trajectory.jsonl and training.png in {result.out_dir}")
    sys.stdout.flush()
