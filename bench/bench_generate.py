"""End-to-end generation throughput: MeZO Engine vs transformers `generate`, same weights, same prompts.

Both sides get the same token-id prompts (lengths drawn from --prompt-len) and produce exactly
--max-tokens greedy tokens per prompt (engine `ignore_eos=True`, transformers `eos_token_id=[]`).
transformers runs all prompts as one left-padded batch, the engine with its own continuous batching;
the Engine is built with `Engine.from_hf` from the very model benchmarked (identical weights). Each side
is warmed up once (full batch, 2 tokens; the engine's prefix cache is then reset, so the timed run
computes every prompt token).

Reported per side: output tokens/s = prompts * max_tokens / wall time of the whole generate call
(prefill included), the fastest of --repeats timed runs in ABBA order (other processes only ever add
time; every run's time and load average are recorded); the ratio engine / transformers; the engine's
time in prefill (extend) passes, decode passes and outside the model (scheduling, sampling,
detokenizing); the share of identical greedy outputs (small numeric differences can flip a near-tie).

    python bench/bench_generate.py                                   # CPU: SmolLM2-135M, fp32
    python bench/bench_generate.py --random-config 1b                # GPU default: ~1.2B LLaMA, bf16
    python bench/bench_generate.py --quick --random-config tiny --out-dir /tmp/x   # CI smoke

On a small shared CPU, one OpenMP thread per core makes every op wait for descheduled threads
(measured: ~5x slower, 2x spread, 2 cores at load 4-5); `--threads 1` is steadier (results then go to
generate_<slug>-t1.*). Results: bench/results/generate_<device-slug>[-<variant>].{json,md}.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (DTYPES, loadavg, md_table, resolve_standard_args, standard_args, timed,  # noqa: E402
                          write_results)
from bench.mezo_workloads import VOCAB, ModelRef, build_hf_model  # noqa: E402
from engine import Engine, SamplingParams  # noqa: E402

# Random-weight LLaMA shapes (bench.common.LLAMA_SHAPES) with each model's own (vocab, context).
RANDOM_CONFIGS = {"tiny": (256, 2048), "smollm2": (49152, 8192), "1b": (128256, 8192), "7b": (32000, 4096)}

# Varied prompts (instructions, code, facts, stories, maths, lists...). Each benchmark prompt starts
# with a different one, so no two prompts share a prefix the engine's prefix cache could reuse.
PROMPTS = [
    'The capital of France is', 'Write a haiku about the sea.',
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n', 'Explain in simple terms why the sky is blue.',
    'Once upon a time, in a small village at the edge of a great forest, there lived',
    'List five tips for staying productive while working from home:\n1.',
    "Translate to German: 'Where is the nearest train station?'", 'Q: What is 17 multiplied by 23?\nA:',
    'SELECT name, COUNT(*) FROM orders WHERE', 'Summarize the plot of Romeo and Juliet in two sentences.',
    'My favourite recipe for a rainy Sunday afternoon is', 'In 1969, the Apollo 11 mission',
    'Write a short, polite email asking a colleague to review a pull request.',
    'import numpy as np\n\ndef normalize(x):', 'The three laws of thermodynamics state that',
    'Dear diary, today was a strange day because', 'What are the main differences between Python lists and tuples?',
    'Photosynthesis is the process by which plants', 'A good password should',
    'Give me a packing list for a three-day hiking trip in the mountains.',
    'The stock market fell sharply on Monday after', 'class Stack:\n    def __init__(self):',
    'Why do cats purr? Scientists believe', 'Here is a limerick about a programmer who never slept:',
    'Describe the water cycle to a ten-year-old.', 'Breaking news: researchers have discovered',
    'To make a cup of green tea properly, first', 'The difference between weather and climate is',
    'Compose a motivational quote for Monday morning:',
    'User: Can you recommend a good science-fiction novel?\nAssistant:', 'The history of the printing press begins',
    "Rewrite this sentence in the passive voice: 'The cat chased the mouse.'",
]


# -- arguments ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = standard_args(__doc__)
    ap.add_argument("--num-prompts", type=int, default=None, help="default 32 (--quick: 4)")
    ap.add_argument("--max-tokens", type=int, default=None, help="output tokens per prompt; default 64 (--quick: 8)")
    ap.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                    help="prompt lengths in tokens, drawn uniformly; default 16 128 (--quick: 4 24)")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs per side, in ABBA order (hf, engine, engine, hf, ...); the fastest run of "
                         "each side is the headline, all are recorded (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    args = resolve_standard_args(ap.parse_args(argv), dict(num_prompts=4, max_tokens=8, prompt_len=[4, 24]),
                                 dict(num_prompts=32, max_tokens=64, prompt_len=[16, 128]))
    lo, hi = args.prompt_len
    if args.num_prompts < 1 or args.max_tokens < 1 or not 1 <= lo <= hi or args.repeats < 1:
        ap.error("need --num-prompts >= 1, --max-tokens >= 1, 1 <= MIN <= MAX, --repeats >= 1")
    args.torch_dtype = DTYPES[args.dtype]
    return args


# -- model and prompts --------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(transformers model on the device, tokenizer or None, description), by mezo_workloads.build_hf_model."""
    vocab, context = RANDOM_CONFIGS.get(args.random_config, (VOCAB, 8192))
    model = build_hf_model(ModelRef(args.model, args.random_config, args.dtype, str(args.device), args.seed,
                                    vocab_size=vocab, context=context))
    if args.random_config is not None:
        return model, None, f"random-{args.random_config}"
    from engine.loader import load_tokenizer, resolve_model

    source = resolve_model(args.model)
    return model, load_tokenizer(source), source.name


def make_prompts(args: argparse.Namespace, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """num_prompts token-id prompts with lengths uniform in --prompt-len (fixed by --seed)."""
    lo, hi = args.prompt_len
    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(lo, hi + 1, (args.num_prompts,), generator=g).tolist()
    if tokenizer is None:  # random model: random ids, clear of pad/bos/eos (0, 1, 2)
        low = 3 if vocab_size > 3 else 0
        return [torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in lengths]
    prompts = []
    for i, n in enumerate(lengths):
        k = len(PROMPTS)
        head = PROMPTS[i % k] if i < k else f"({i // k}) {PROMPTS[i % k]}"  # distinct first tokens
        ids = list(tokenizer.encode(head))
        j = i + 1
        while len(ids) < n:  # pad out to the target length with other prompts' text
            ids += list(tokenizer.encode("\n\n" + PROMPTS[j % k], add_special_tokens=False))
            j += 1
        prompts.append(ids[:n])
    return prompts


# -- the two sides ------------------------------------------------------------------------------
def hf_generate(model: Any, prompts: list[list[int]], n: int, pad_id: int, device: torch.device) -> list[list[int]]:
    """One left-padded batch, greedy, exactly n new tokens per row (EOS disabled)."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import GenerationConfig

    ids = pad_sequence([torch.tensor(p) for p in prompts], batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones(len(p), dtype=torch.long) for p in prompts], batch_first=True, padding_side="left")
    width = ids.shape[1]
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                          pad_token_id=pad_id, eos_token_id=[])  # [] = never stop at EOS, like ignore_eos
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gc)
    new = out[:, width:].tolist()
    if any(len(r) != n for r in new):
        raise RuntimeError(f"transformers produced {[len(r) for r in new]} tokens, expected {n} each")
    return new


@contextlib.contextmanager
def timed_passes(engine: Engine) -> Iterator[list[tuple[str, int, int, float]]]:
    """Times the engine's model passes by wrapping its runner (cheap: one sync per pass); yields the
    list of (mode, requests, tokens, seconds) it fills."""
    runner, passes = engine.runner, []
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    orig = type(runner).run.__get__(runner)

    def run(scheduled):  # perf_counter, not bench_seconds: a pass is short and its timer must be cheap
        sync()
        t0 = time.perf_counter()
        out = orig(scheduled)
        sync()
        tokens = sum(r.seq_len - s for r, s in zip(scheduled.requests, scheduled.starts))
        passes.append((scheduled.mode, len(scheduled.requests), tokens, time.perf_counter() - t0))
        return out

    runner.run = run
    try:
        yield passes
    finally:
        del runner.run  # back to the class method


def split(passes: list[tuple[str, int, int, float]], total_s: float) -> dict[str, Any]:
    """Time in prefill (extend) passes, in decode passes and outside the model."""
    out: dict[str, Any] = {}
    for key, mode in (("prefill", "extend"), ("decode", "decode")):
        sel = [p for p in passes if p[0] == mode]
        secs, toks = sum(p[3] for p in sel), sum(p[2] for p in sel)
        out[key] = {"passes": len(sel), "tokens": toks, "seconds": secs, "tok_s": toks / secs if secs else None,
                    "max_batch": max((p[1] for p in sel), default=0)}
    out["outside_model_s"] = total_s - out["prefill"]["seconds"] - out["decode"]["seconds"]
    out["outside_model_share"] = out["outside_model_s"] / total_s if total_s else None
    return out


def engine_generate(engine: Engine, prompts: list[list[int]], n: int) -> list[list[int]]:
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    comps = engine.generate(prompts, params, use_tqdm=False)
    out = [c.token_ids for c in comps]
    if any(len(r) != n for r in out):
        raise RuntimeError(f"engine produced {[len(r) for r in out]} tokens, expected {n} each")
    return out


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float]:
    """Share of prompts with identical greedy outputs, and mean share of tokens before the first mismatch."""
    prefix = [len(os.path.commonprefix([x, y])) / max(len(x), 1) for x, y in zip(a, b)]
    return {"exact_match": sum(x == y for x, y in zip(a, b)) / len(a), "mean_matching_prefix": statistics.mean(prefix)}


# -- main ---------------------------------------------------------------------------------------
def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load_before = loadavg()
    print(f"loading {args.model or 'random-' + args.random_config} ({args.dtype}) on {device} ...", flush=True)
    model, tokenizer, model_desc = build_model(args)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    prompts = make_prompts(args, tokenizer, cfg.vocab_size)
    n, max_len = args.max_tokens, max(len(p) for p in prompts)
    if max_len + n > cfg.max_position_embeddings:
        raise SystemExit(f"prompt ({max_len}) + max_tokens ({n}) exceeds max_position_embeddings "
                         f"({cfg.max_position_embeddings})")
    pad_id = next((t for t in (getattr(tokenizer, "pad_token_id", None), cfg.pad_token_id,
                               getattr(tokenizer, "eos_token_id", None)) if t is not None), 0)
    ps = args.page_size
    cache_tokens = sum(-(-(len(p) + n) // ps) * ps for p in prompts) + ps  # everything fits: no preemption
    engine = Engine.from_hf(model, tokenizer=tokenizer, dtype=args.torch_dtype, device=device,
                            page_size=ps, max_cache_tokens=cache_tokens)

    # warm-up: full batch, 2 tokens each side; then forget the cached prompts
    warm = min(2, n)
    hf_generate(model, prompts, warm, pad_id, device)
    engine_generate(engine, prompts, warm)
    engine.reset_cache()

    # ABBA order (hf, engine, engine, hf, hf, ...): a load that drifts during the run hits both alike.
    # Other processes only ever add time, so the fastest run of each side is the headline.
    times: dict[str, list[float]] = {"hf": [], "engine": []}
    outs, splits, run_load = {}, [], []
    stats0 = engine.cache_stats()
    order = [side for r in range(args.repeats) for side in (("hf", "engine") if r % 2 == 0 else ("engine", "hf"))]
    for side in order:
        if side == "hf":
            outs[side], dt = timed(lambda: hf_generate(model, prompts, n, pad_id, device), device)
        else:
            engine.reset_cache()  # the timed run computes every prompt token
            with timed_passes(engine) as passes:
                outs[side], dt = timed(lambda: engine_generate(engine, prompts, n), device)
            splits.append(split(passes, dt))
        times[side].append(dt)
        run_load.append({"side": side, "seconds": dt, "loadavg_1min_after": (loadavg() or [None])[0]})
        print(f"  {side:12s} run: {dt:.2f} s", flush=True)
    stats1 = engine.cache_stats()
    hf_times, eng_times = times["hf"], times["engine"]
    out_tokens = len(prompts) * n
    prompt_tokens = sum(len(p) for p in prompts)

    def side(times: list[float]) -> dict[str, Any]:
        best = min(times)
        return {"seconds": best, "seconds_all": times, "seconds_median": statistics.median(times),
                "output_tokens": out_tokens, "output_tok_s": out_tokens / best,
                "total_tok_s": (prompt_tokens + out_tokens) / best}

    computed = stats1["tokens_computed"] - stats0["tokens_computed"]
    default_model = model_desc == ("random-1b" if device.type == "cuda" else "smollm2-135m")
    variant = "-quick" if args.quick else ("" if default_model else f"-{model_desc.replace('random-', 'random')}")
    if args.threads is not None:
        variant += f"-t{args.threads}"
    payload: dict[str, Any] = {
        "benchmark": "generate", "loadavg_before": load_before, "loadavg_after": loadavg(), "runs": run_load,
        "config": {
            "model": model_desc, "parameters": n_params, "dtype": args.dtype, "device": str(device),
            "num_prompts": len(prompts), "max_tokens": n, "prompt_len_range": list(args.prompt_len),
            "prompt_tokens": prompt_tokens, "prompt_len_mean": prompt_tokens / len(prompts), "max_prompt_len": max_len,
            "hf_padded_prompt_tokens": max_len * len(prompts), "page_size": ps, "engine_cache_tokens": cache_tokens,
            "engine_attention_backend": engine.backend.name,
            "hf_attn_implementation": getattr(cfg, "_attn_implementation", None),
            "repeats": args.repeats, "run_order": order, "torch_threads": torch.get_num_threads(),
            "warmup": f"1 run per side, full batch, {warm} tokens", "seed": args.seed, "quick": args.quick,
        },
        "engine": {**side(eng_times), "split": splits[eng_times.index(min(eng_times))],
                   "tokens_computed": computed // args.repeats,
                   "forward_passes": (stats1["forward_passes"] - stats0["forward_passes"]) // args.repeats,
                   "preemptions": stats1["preemptions"] - stats0["preemptions"]},
        "transformers": side(hf_times),
        "ratio_engine_over_transformers": min(hf_times) / min(eng_times),
        "greedy_agreement": agreement(outs["engine"], outs["hf"]),
    }
    jpath, mpath = write_results("generate", payload, to_markdown(payload), title="Generation throughput: MeZO Engine "
                                 "vs transformers generate", device=device, script=__file__, argv=argv,
                                 out_dir=args.out_dir, variant=variant)
    print(to_markdown(payload))
    print(f"wrote {jpath} and {mpath.name}")
    return payload


def to_markdown(p: dict[str, Any]) -> str:
    c, e, h, sp = p["config"], p["engine"], p["transformers"], p["engine"]["split"]
    lines = [f"Load average (1/5/15 min): before {p['loadavg_before']}, after {p['loadavg_after']}; 1-min load "
             f"after each timed run: " + ", ".join(f"{r['side']} {r['loadavg_1min_after']}" for r in p["runs"]), "",
             f"Model {c['model']} ({c['parameters'] / 1e6:.1f} M parameters), {c['dtype']}; "
             f"{c['num_prompts']} prompts of "
             f"{c['prompt_len_range'][0]}-{c['prompt_len_range'][1]} tokens (mean {c['prompt_len_mean']:.1f}, "
             f"{c['prompt_tokens']} in all; transformers pads them to {c['hf_padded_prompt_tokens']}), "
             f"{c['max_tokens']} greedy output tokens each (EOS ignored on both sides). "
             f"Engine attention backend: {c['engine_attention_backend']}; transformers attention: "
             f"{c['hf_attn_implementation']}. Warm-up: {c['warmup']}. Timed runs per side: {c['repeats']}, order "
             f"{' '.join(c['run_order'])}; the fastest run of each side is reported (other processes only add "
             "time).", "",
             "## Throughput", ""]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines += md_table([["MeZO Engine", e["seconds"], e["output_tok_s"], e["total_tok_s"], fmt(e["seconds_all"])],
                       ["transformers generate", h["seconds"], h["output_tok_s"], h["total_tok_s"],
                        fmt(h["seconds_all"])]],
                      ["", "wall s (best)", "output tok/s", "(prompt+output) tok/s", "all runs, s"])
    lines += ["", f"**Ratio engine / transformers (output tok/s): {p['ratio_engine_over_transformers']:.2f}x**", "",
              "## Engine time split", ""]
    rows = [[k, sp[k]["passes"], sp[k]["max_batch"], sp[k]["tokens"], sp[k]["seconds"], sp[k]["tok_s"] or 0.0]
            for k in ("prefill", "decode")]
    rows.append(["outside model (schedule, sample, detokenize)", "", "", "", sp["outside_model_s"], ""])
    lines += md_table(rows, ["phase", "passes", "max batch", "tokens", "seconds", "tok/s"])
    a = p["greedy_agreement"]
    lines += ["", f"Engine: {e['forward_passes']} forward passes, {e['tokens_computed']} tokens computed, "
              f"{e['preemptions']} preemptions.",
              f"Greedy outputs: {a['exact_match']:.0%} of prompts identical between the two; mean matching prefix "
              f"{a['mean_matching_prefix']:.0%}."]
    return "\n".join(lines)


if __name__ == "__main__":
    run()
