"""`mezo-engine` console script: generate, finetune, bench."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from .engine import Engine
    from .sampling_params import SamplingParams

    prompts = list(args.prompts)
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print("error: give at least one prompt (positional or --prompts-file)", file=sys.stderr)
        return 2
    engine = Engine(args.model, dtype=args.dtype, device=args.device, page_size=args.page_size)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    # chat: the template's own token ids (its BOS included), never the rendered text re-encoded
    inputs = [engine.chat_ids([{"role": "user", "content": p}]) for p in prompts] if args.chat else prompts
    start = time.perf_counter()
    outs = engine.generate(inputs, params, use_tqdm=len(prompts) > 1)
    elapsed = time.perf_counter() - start
    n_out = sum(len(o.token_ids) for o in outs)
    for prompt, out in zip(prompts, outs):
        if args.json:
            print(json.dumps({"prompt": prompt, "text": out.text, "finish_reason": out.finish_reason,
                              "prompt_tokens": out.prompt_tokens, "cached_tokens": out.cached_tokens}))
        else:
            print(f"--- {prompt!r}\n{out.text}\n[{out.finish_reason}; {out.prompt_tokens} prompt tokens, "
                  f"{out.cached_tokens} cached, {len(out.token_ids)} generated]")
    print(f"{len(outs)} requests, {n_out} tokens in {elapsed:.2f}s ({n_out / elapsed:.1f} tok/s) on "
          f"{engine.device.type}", file=sys.stderr)
    return 0


def _finetune(args: argparse.Namespace) -> int:
    try:
        from mezo.cli import run_finetune
    except ImportError as err:  # pragma: no cover - depends on the MeZO package being present
        print(f"error: MeZO fine-tuning is not available: {err}", file=sys.stderr)
        return 2
    return run_finetune(args)


def _bench(args: argparse.Namespace) -> int:
    try:
        from bench.suite import run
    except ImportError as err:
        print(f"error: the benchmark suite is not available ({err}); run it from a checkout of the repository "
              "with the bench extra: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    return run(args)


EXAMPLES = """examples:
  mezo-engine generate --model smollm2-135m --chat "Write a haiku about the sea."
  mezo-engine finetune --model smollm2-135m --task bbc_news --preset opt-lora --steps 300 --out runs/bbc
  mezo-engine finetune --list-presets
  mezo-engine bench --quick                  # every benchmark at toy size (minutes on a CPU)
  mezo-engine bench --device cuda --out DIR  # the GPU figures
  mezo-engine bench --gpu [--dry-run]        # the GPU suite (<= 8 min on one H100/H200; CI: --dry-run)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mezo-engine", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text with continuous batching")
    gen.add_argument("prompts", nargs="*")
    gen.add_argument("--prompts-file")
    gen.add_argument("--model", default="smollm2-135m")
    gen.add_argument("--dtype", default="auto")
    gen.add_argument("--device", default="auto")
    gen.add_argument("--page-size", type=int, default=16)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    gen.add_argument("--json", action="store_true", help="one JSON object per line")
    gen.set_defaults(func=_generate)
    try:
        from mezo.cli import add_finetune_arguments
    except ImportError:
        add_finetune_arguments = None
    if add_finetune_arguments is not None:
        ft = sub.add_parser("finetune", help="MeZO fine-tuning (see README)")
        add_finetune_arguments(ft)
        ft.set_defaults(func=_finetune)
    bench = sub.add_parser("bench", help="run the benchmark suite and write its results",
                           description="Kernels, attention, generation and MeZO-step benchmarks, each in its own "
                                       "process with a time budget; JSON + markdown results and a summary table.")
    try:
        from bench.suite import add_arguments
    except ImportError:
        add_arguments = None
    if add_arguments is not None:
        add_arguments(bench)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
