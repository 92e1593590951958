"""Data-parallel MeZO (mezo/distributed.py) on gloo with 2 CPU processes against single-process runs on
the same global batches: the same trainable tensors (<= 1e-6, fp32) and trajectory; resume across
world sizes (2 -> 1 and 1 -> 2); exactly one collective per step; the checkpoint consistency guard;
clear errors for a world larger than the batch and a rank that cannot load the model.

One 2-rank job (tests/mezo_dist_worker.py, started with torchrun's environment) runs every distributed
scenario in one process group, so the processes start once.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mezo.checkpoint import TrajectoryLog
from mezo.distributed import shard_range
from mezo.trainer import MeZOTrainer
from mezo_dist_worker import dist_config
from mezo_helpers import ALL_HEADLINES, make_engine, tokenizer

WORKER = Path(__file__).with_name("mezo_dist_worker.py")
CANDIDATES = [" business", " entertainment", " politics", " sport", " tech"]
STEPS, BATCH = 4, 5  # 5 over 2 ranks: uneven shards (3 + 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_jsonl(path: Path, heads: list[str], offset: int = 0) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"Headline: {h}\nTopic:", "candidates": CANDIDATES,
                                        "label": (i + offset) % 5}) + "\n" for i, h in enumerate(heads)))
    return path


def _trainable(out: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"ckpt-{step}" / "trainable.safetensors")


def _assert_close(a: dict, b: dict, atol: float = 1e-6) -> None:
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _single(data: Path, eval_path: Path | None, out: Path, mode: str, crash_at: int | None = None,
            monkeypatch=None, **extra):
    """The single-process run (no process group) of the same config, optionally crashing at a step."""
    engine = make_engine()
    if crash_at is not None:
        step = MeZOTrainer.step

        def crashing(self, examples):
            if self.step_count == crash_at:
                raise RuntimeError("injected crash")
            return step(self, examples)

        monkeypatch.setattr(MeZOTrainer, "step", crashing)
        with pytest.raises(RuntimeError, match="injected crash"):
            engine.finetune(str(data), None, dist_config(mode, STEPS, BATCH), out_dir=out, progress=False)
        monkeypatch.setattr(MeZOTrainer, "step", step)
        return None
    return engine.finetune(str(data), str(eval_path) if eval_path else None,
                           dist_config(mode, STEPS, BATCH, **extra), out_dir=out, progress=False)


def test_shard_range_tiles_the_batch():
    for n in range(1, 12):
        for world in range(1, n + 1):
            ranges = [shard_range(n, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [hi - lo for lo, hi in ranges]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_backend_and_device_choice(monkeypatch):
    from mezo import distributed as d

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="backend 'mpi'"):
        d.init_from_env("cpu", "mpi")
    with pytest.raises(ValueError, match="'nccl' needs a CUDA device"):
        d.init_from_env("cpu", "nccl")
    assert d.local_device("cpu") == "cpu"
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a fake GPU host: LOCAL_RANK picks the GPU
    assert d.local_device("auto") == d.local_device("cuda") == "cuda:3"
    assert d.local_device("cuda:0") == "cuda:0"  # an explicit device is kept
    assert d.current_context() is None and d.agree(None, lambda: 7, "x") == 7  # no group: no collectives
    with d.process_group_from_env("cpu") as (ctx, device):  # not under torchrun: nothing joined
        assert ctx is None and device == "cpu"


def test_two_ranks_match_one_process(tmp_path, monkeypatch):
    data = _write_jsonl(tmp_path / "train.jsonl", ALL_HEADLINES[:10])
    eval_path = _write_jsonl(tmp_path / "eval.jsonl", ALL_HEADLINES[10:13], offset=2)  # 3 over 2 ranks
    tok_dir = tmp_path / "tokenizer"
    tokenizer().save_pretrained(tok_dir)
    # a single-process run killed after its step-2 checkpoint; the 2-rank job resumes it
    _single(data, None, tmp_path / "crash1", "lora", crash_at=3, monkeypatch=monkeypatch)
    assert (tmp_path / "crash1" / "checkpoints" / "ckpt-2").is_dir()

    def sc(name, mode="lora", **kw):
        return {"name": name, "out": str(tmp_path / name), "mode": mode, "steps": STEPS, "batch_size": BATCH, **kw}

    job = {"data": str(data), "tokenizer": str(tok_dir), "report_dir": str(tmp_path), "scenarios": [
        sc("lora2", eval=str(eval_path)), sc("full2", "full"), sc("crash2", crash_at=3),
        {**sc("resume1to2"), "out": str(tmp_path / "crash1")}, sc("guard2", alter_rank=1),
        sc("toolarge", batch_size=1), sc("loadfail", agree_fail_rank=1),
        sc("grzo2", config={"estimator": "per_example"}),
        sc("tput2", config={"shard_balance": "throughput"}, slow_rank=1)]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "job.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # the single-process references run while the ranks start
    ref_lora = _single(data, eval_path, tmp_path / "lora1", "lora")
    _single(data, None, tmp_path / "full1", "full")
    _single(data, None, tmp_path / "grzo1", "lora", estimator="per_example")
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)
    reports = [json.loads((tmp_path / f"REPORT-{r}.json").read_text()) for r in range(2)]
    rep = reports[0]

    # 1. LoRA and full mode, and per-example perturbations (rank 1's examples 3, 4 perturbed by the
    # global batch's z_3, z_4): the same tensors and trajectory as one process; the same evaluations
    for name, ref in (("lora2", "lora1"), ("full2", "full1"), ("grzo2", "grzo1")):
        assert all(r[name]["ok"] for r in reports), [r[name] for r in reports]
        _assert_close(_trainable(tmp_path / name), _trainable(tmp_path / ref))
        got, want = (TrajectoryLog(tmp_path / d / "trajectory.jsonl").read() for d in (name, ref))
        assert [(r.step, r.seed, r.lr) for r in got] == [(r.step, r.seed, r.lr) for r in want] and len(got) == STEPS
        for g, w in zip(got, want):
            assert g.seeds == w.seeds and len(g.seeds) == (BATCH if name == "grzo2" else 1)
            assert g.projected_grad == pytest.approx(w.projected_grad, rel=1e-5, abs=1e-5)
            assert g.loss == pytest.approx(w.loss, rel=1e-6, abs=1e-6)
    _assert_close(load_file(tmp_path / "lora2" / "adapter" / "adapter_model.safetensors"),
                  load_file(tmp_path / "lora1" / "adapter" / "adapter_model.safetensors"))
    def tokens(out: Path) -> list[int]:
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["tokens_computed"] for r in recs if r["kind"] == "train"]

    # tokens_computed counts every rank's shard (a shard cannot share a prompt prefix with another rank's)
    assert all(t2 >= t1 > 0 for t2, t1 in zip(tokens(tmp_path / "lora2"), tokens(tmp_path / "lora1"), strict=True))
    records = [json.loads(line) for line in (tmp_path / "lora2" / "metrics.jsonl").read_text().splitlines()]
    assert all(sum(r["rank_tokens"]) == r["tokens_computed"] and min(r["rank_seconds"]) > 0
               for r in records if r["kind"] == "train")

    # shard_balance="throughput": rank 1, made slow, gets fewer tokens from step 1 on (its measured
    # speed), and the run still ends where one process does (the split never changes the update)
    assert all(r["tput2"]["ok"] for r in reports), [r["tput2"] for r in reports]
    _assert_close(_trainable(tmp_path / "tput2"), _trainable(tmp_path / "lora1"))
    split = [r["rank_tokens"] for r in map(json.loads, (tmp_path / "tput2" / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "train"]
    assert len(split) == STEPS and all(2 * t1 < t0 for t0, t1 in split[1:]), split
    assert split[0][1] > split[1][1], split  # step 0 knew no speeds: the token split
    got_evals = [rep["lora2"]["initial_eval"]] + rep["lora2"]["evals"]
    want_evals = [ref_lora.initial_eval] + ref_lora.evals
    for g, w in zip(got_evals, want_evals, strict=True):
        assert g["n"] == w["n"] == 3 and g["accuracy"] == w["accuracy"]
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-6)
    assert reports[1]["lora2"]["final_eval"] == rep["lora2"]["final_eval"]

    # 3. exactly one collective per step; checkpoints add the guard, evaluations their gather
    for r in reports:
        events = r["full2"]["events"]  # no eval set: start-up, 4 steps, guards at steps 2 and 4
        assert events == (["broadcast_object_list"] + ["<step>", "all_reduce", "</step>"] * 2 + ["all_reduce"]
                          + ["<step>", "all_reduce", "</step>"] * 2 + ["all_reduce"]), events
        steps = "".join(f"|{e}" for e in r["lora2"]["events"]).split("|<step>")[1:]
        assert len(steps) == STEPS and all(s.startswith("|all_reduce|</step>") for s in steps)

    # 2. killed after a checkpoint with 2 ranks, resumed with 1; and killed with 1, resumed with 2
    assert all(not r["crash2"]["ok"] and "injected crash at step 3" in r["crash2"]["error"] for r in reports)
    assert (tmp_path / "crash2" / "checkpoints" / "ckpt-2").is_dir()
    assert not (tmp_path / "crash2" / "checkpoints" / "ckpt-4").exists()
    resumed = _single(data, None, tmp_path / "crash2", "lora")
    assert resumed.resumed_from == 2
    _assert_close(_trainable(tmp_path / "crash2"), _trainable(tmp_path / "lora1"))
    assert all(r["resume1to2"]["ok"] and r["resume1to2"]["resumed_from"] == 2 for r in reports)
    _assert_close(_trainable(tmp_path / "crash1"), _trainable(tmp_path / "lora1"))
    _assert_close(load_file(tmp_path / "crash1" / "adapter" / "adapter_model.safetensors"),
                  load_file(tmp_path / "lora1" / "adapter" / "adapter_model.safetensors"))
    assert len(TrajectoryLog(tmp_path / "crash1" / "trajectory.jsonl").read()) == STEPS

    # 3. the guard: rank 1 altered its tensors; both ranks stop at the step-2 checkpoint, none written
    for r in reports:
        assert not r["guard2"]["ok"], r["guard2"]
        assert "RankMismatchError" in r["guard2"]["error"] and "rank(s) [1]" in r["guard2"]["error"]
        assert "step 2" in r["guard2"]["error"]
    assert not (tmp_path / "guard2" / "checkpoints" / "ckpt-2").exists()

    # bad input: a world larger than the batch; a rank that cannot load the model (named on every rank)
    for r in reports:
        assert "batch_size=1 is smaller than the world size 2" in r["toolarge"]["error"]
        assert r["toolarge"]["events"] == []  # raised before any collective: no rank waits
        assert "RankFailedError: loading the model failed on rank(s) [1] of 2" in r["loadfail"]["error"]
    assert "FileNotFoundError: no model at /nonexistent" in reports[1]["loadfail"]["error"]


@pytest.mark.parametrize("objective", ["classification", "f1"])
def test_one_rank_group_matches_plain_trainer(objective, device):
    """The slots ([k, branch, example], n-SPSA 2) in a 1-rank group in this process (gloo on CPU, NCCL on
    CUDA: the GPU suite's check of the NCCL path, with the throughput split's CUDA timing): the same g,
    update and evaluation as the plain trainer; F1 (generation) averages its scores as one process does."""
    from dataclasses import replace

    import torch.distributed as dist

    from mezo import LMExample, MeZOConfig
    from mezo.distributed import DistributedMeZOTrainer, make_trainer
    from mezo_helpers import classification_examples

    if objective == "f1":  # targets = the model's own greedy text, so that perturbed F1s are not all 0
        from engine import SamplingParams

        prompts = [f"Headline: {h}\nTopic:" for h in ALL_HEADLINES[:3]]
        outs = make_engine(device=device).generate(prompts, SamplingParams(max_tokens=3, temperature=0.0,
                                                                           stop=["\n"]))
        examples = [LMExample(p, o.text) for p, o in zip(prompts, outs)]
    else:
        examples = classification_examples("", CANDIDATES, n=3)
    config = MeZOConfig(lr=1e-2, eps=1e-2, batch_size=3, n_spsa=2, seed=5, steps=2, objective=objective,
                        max_new_tokens=3)
    plain = make_trainer(make_engine(device=device), config)
    want = [plain.step(examples) for _ in range(2)]
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(torch.device(device).index or 0)  # the fixture's "cuda" has no index
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0,
                            world_size=1)
    try:
        trainer = make_trainer(make_engine(device=device), replace(config, shard_balance="throughput"))
        assert isinstance(trainer, DistributedMeZOTrainer)
        got = [trainer.step(examples) for _ in range(2)]
        assert trainer.ctx.backend == ("nccl" if cuda else "gloo") and trainer.rank_speeds is not None
        assert all(r["rank_seconds"][0] > 0 and r["rank_tokens"][0] == r["tokens_computed"] > 0 for r in got)
        assert trainer.evaluate(examples) == pytest.approx(plain.evaluate(examples), abs=1e-6)
        assert trainer.check_consistency() != 0
    finally:
        dist.destroy_process_group()
    # exact on CPU; on CUDA the batch mean over a [branch, example] row and over a plain vector may be
    # reduced in another order (last bit)
    tol = {"rel": 1e-6, "abs": 1e-7} if cuda else {"rel": 0, "abs": 0}
    for g, w in zip(got, want):
        assert g["seeds"] == w["seeds"] and len(g["projected_grad"]) == 2
        assert g["projected_grad"] == pytest.approx(w["projected_grad"], **tol)
        assert g["loss"] == pytest.approx(w["loss"], **tol)
    _assert_close(dict(trainer.params), dict(plain.params), atol=1e-6 if cuda else 0)


def test_failed_shard_is_named_on_every_rank_and_leaves_no_state(monkeypatch):
    """A shard whose forward raises still takes part in the step's all_reduce (so no other rank waits
    in it), and every rank raises RankFailedError naming the failed rank; the engine is left clean."""
    import torch.distributed as dist

    from kernels.noise_cache import noise_cache_bytes
    from mezo import MeZOConfig
    from mezo.distributed import RankFailedError, make_trainer
    from mezo_helpers import classification_examples

    examples = classification_examples("", CANDIDATES, n=3)
    config = MeZOConfig(lr=1e-2, eps=1e-2, batch_size=3, seed=5, steps=2)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        engine = make_engine()
        trainer = make_trainer(engine, config)
        calls = []

        def failing_forward(batch):
            calls.append(1)
            raise RuntimeError("injected forward failure")

        with monkeypatch.context() as m:
            m.setattr(engine.runner, "forward", failing_forward)
            with pytest.raises(RankFailedError, match=r"rank\(s\) \[0\] of 1: RuntimeError: injected forward failure"):
                trainer.step(examples)
        assert calls and engine.runner.perturbation is None and noise_cache_bytes() == 0
        assert not engine.scheduler.running and not engine.scheduler.waiting
        record = trainer.step(examples)  # the engine and the process group stay usable
        assert record["step"] == 0 and not record["skipped"]
    finally:
        dist.destroy_process_group()


def test_shard_balance_option():
    import argparse

    from mezo import MeZOConfig
    from mezo.cli import add_finetune_arguments, build_config

    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    assert build_config(parser.parse_args(["--shard-balance", "throughput"])).shard_balance == "throughput"
    assert build_config(parser.parse_args([])).shard_balance == "tokens"
    with pytest.raises(ValueError, match=r"shard_balance='speed': must be one of \('tokens', 'throughput'\)"):
        MeZOConfig(shard_balance="speed")
