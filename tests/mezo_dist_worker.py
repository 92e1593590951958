"""One rank of a data-parallel MeZO test job (used by test_mezo_distributed.py).

    RANK=r WORLD_SIZE=n MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/mezo_dist_worker.py JOB.json

The environment is what torchrun sets; JOB.json names the data, the tokenizer directory (see
mezo_finetune_worker.py), and a list of scenarios run one after the other in the same process group:
{"name", "out", "mode", "steps", "batch_size", "config" (MeZOConfig overrides), "crash_at" (raise on every rank when that step starts),
"alter_rank" (that rank adds 1e-3 to one trainable tensor after step 0), "slow_rank" (that rank
sleeps 0.2 s per example of its shard in every step), "eval" (JSONL or null)}.
Every rank writes REPORT-<rank>.json: per scenario its status (ok or the error) and the collectives it
made, in order, with "<step>"/"</step>" around each MeZO step.
"""
from __future__ import annotations

import json
import os
import sys
import time

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_TESTS, os.path.dirname(_TESTS)]  # this checkout's packages, whatever is installed
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MEZO_COMPILE_NOISE", "0")

COLLECTIVES = ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object",
               "reduce", "gather", "scatter", "barrier", "all_to_all")


def dist_config(mode: str, steps: int, batch_size: int, **extra):
    """The one config every distributed test (and its single-process reference) uses; `extra`
    overrides fields (a scenario's "config", e.g. another estimator)."""
    from mezo import MeZOConfig

    return MeZOConfig(**{"lr": 1e-2 if mode == "lora" else 1e-3, "eps": 1e-2, "steps": steps,
                         "batch_size": batch_size, "checkpoint_every": 2, "eval_every": 2, "eval_size": None,
                         "seed": 3, "mode": mode, **extra})


def install_hooks(events: list[str], scenario: dict, rank: int) -> None:
    """Count collectives; mark steps; inject the scenario's crash or tensor alteration."""
    import torch.distributed as dist

    from mezo.trainer import MeZOTrainer

    for name in COLLECTIVES:
        fn = getattr(dist, name)
        fn = getattr(fn, "__wrapped_collective__", fn)

        def counted(*a, __fn=fn, __name=name, **kw):
            events.append(__name)
            return __fn(*a, **kw)

        counted.__wrapped_collective__ = fn
        setattr(dist, name, counted)

    step = getattr(MeZOTrainer.step, "__wrapped_step__", MeZOTrainer.step)

    def hooked_step(self, examples):
        if scenario.get("crash_at") is not None and self.step_count == scenario["crash_at"]:
            raise RuntimeError(f"injected crash at step {self.step_count}")
        events.append("<step>")
        record = step(self, examples)
        events.append("</step>")
        if scenario.get("alter_rank") == rank and self.step_count == 1:
            next(iter(self.params.values())).data.add_(1e-3)
        return record

    hooked_step.__wrapped_step__ = step
    MeZOTrainer.step = hooked_step

    run_plan = getattr(MeZOTrainer.run_plan, "__wrapped_plan__", MeZOTrainer.run_plan)

    def hooked_run_plan(self, encoded, plan, indices=None):
        if scenario.get("slow_rank") == rank:
            time.sleep(0.2 * len(encoded))
        return run_plan(self, encoded, plan, indices)

    hooked_run_plan.__wrapped_plan__ = run_plan
    MeZOTrainer.run_plan = hooked_run_plan


def agree_scenario(fail_rank: int, rank: int) -> dict:
    from mezo.distributed import agree, current_context

    def load():
        if rank == fail_rank:
            raise FileNotFoundError("no model at /nonexistent")
        return "engine"

    try:
        agree(current_context(), load, "loading the model")
        return {"ok": True}
    except Exception as err:  # noqa: BLE001 - reported to the test
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}


def main() -> int:
    import torch

    torch.set_num_threads(1)
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    from transformers import AutoTokenizer

    import mezo_fixtures
    from mezo.distributed import init_from_env

    init_from_env("cpu", timeout_s=120)
    rank = int(os.environ["RANK"])
    tok = AutoTokenizer.from_pretrained(job["tokenizer"])
    mezo_fixtures.smollm2_tokenizer = lambda: tok  # same vocabulary, fast to load
    report = {}
    for sc in job["scenarios"]:
        events: list[str] = []
        install_hooks(events, sc, rank)
        if sc.get("agree_fail_rank") is not None:  # a rank that cannot load the model
            report[sc["name"]] = agree_scenario(sc["agree_fail_rank"], rank)
            continue
        engine, _, _ = mezo_fixtures.tiny_text_engine()
        config = dist_config(sc["mode"], sc["steps"], sc["batch_size"], **sc.get("config", {}))
        try:
            result = engine.finetune(job["data"], sc.get("eval"), config, out_dir=sc["out"], progress=False)
            status = {"ok": True, "resumed_from": result.resumed_from, "evals": result.evals,
                      "initial_eval": result.initial_eval, "final_eval": result.final_eval}
        except Exception as err:  # noqa: BLE001 - reported to the test
            status = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        report[sc["name"]] = {**status, "events": events}
    with open(os.path.join(job["report_dir"], f"REPORT-{rank}.json"), "w") as fh:
        json.dump(report, fh)
    import torch.distributed as dist

    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
