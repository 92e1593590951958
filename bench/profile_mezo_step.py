"""Where a CPU MeZO step goes: the engine's step vs the competent transformers loop, in one process.

Both sides are built on the same weights, adapter and batch (scenario 1 of bench_mezo.py: BBC
headlines, LoRA, B = 16), timed interleaved (A B A B ...: a shared machine's load falls on both),
then one engine step and one loop step run under torch.profiler. Writes the timings and the top ops
of each profile to bench/results/mezo_step_profile_<device>.{json,md}. In-process on purpose: this is
about time, not peak memory (bench_mezo.py isolates each contestant for its memory figures).

    python bench/profile_mezo_step.py --threads 2           # SmolLM2-135M fp32 on CPU
    python bench/profile_mezo_step.py --random-config tiny  # smoke
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import mezo_workloads as w  # noqa: E402
from bench.common import bench_seconds, loadavg, write_results  # noqa: E402


def profile_table(fn: Any, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48)


def run(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--random-config", default=None, help="random LLaMA shape instead of --model (e.g. tiny)")
    ap.add_argument("--scenario", default="cls", choices=sorted(w.SCENARIOS))
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timed steps per side")
    ap.add_argument("--top", type=int, default=25, help="profile rows kept (0: no profile, timings only)")
    ap.add_argument("--out-dir", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ref = w.ModelRef(None if args.random_config else args.model, args.random_config, "float32", "cpu")
    scenario = w.SCENARIOS[args.scenario]
    tok = w.load_tokenizer(None)
    hf = w.build_hf_model(ref)
    examples = w.build_examples(scenario, w.Sizes(batch_size=args.batch_size), tok)
    trainer, encoded = w.build_engine(hf, tok, ref, scenario, examples)
    init = {k: v.detach().clone() for k, v in trainer.params.items()} if scenario.mode == "lora" else None
    loop, batch = w.build_hf_loop(hf, tok, ref, scenario, examples, init)
    sides = {"engine": lambda: trainer.step(encoded), "hf_loop": lambda: loop.step(batch, seed=7)}
    load_before = loadavg()
    for fn in sides.values():  # warm-up (first-call costs: caches, compiled noise)
        fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            times[name].append(bench_seconds(fn, "cpu", repeats=1))
    median = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    profiles = {name: profile_table(fn, args.top) for name, fn in sides.items()} if args.top > 0 else {}
    payload = {"model": ref.label, "scenario": args.scenario, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "rounds": args.rounds, "step_s": times, "median_step_s": median,
               "engine_speedup_vs_hf_loop": median["hf_loop"] / median["engine"],
               "loadavg": {"before": load_before, "after": loadavg()},
               "hf_loop_batch_shape": list(batch.input_ids.shape)}
    md = [f"Engine step {median['engine']:.3f} s, competent transformers loop {median['hf_loop']:.3f} s "
          f"(median of {args.rounds} interleaved steps each): **{payload['engine_speedup_vs_hf_loop']:.2f}x**.", "",
          f"Load average before / after: {payload['loadavg']['before']} / {payload['loadavg']['after']}", ""]
    for name, table in profiles.items():
        md += [f"## torch.profiler: one {name} step, ops by self CPU time", "", "```", table, "```", ""]
    write_results("mezo_step_profile", payload, "\n".join(md), title="MeZO step profile: engine vs careful transformers loop",
                  device="cpu", script=__file__, argv=argv, out_dir=args.out_dir)
    print("\n".join(md))
    return payload


if __name__ == "__main__":
    run()
