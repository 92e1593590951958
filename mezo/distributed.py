"""Data-parallel MeZO on torch.distributed (DESIGN §13): every rank holds the model, takes a
shard of each step's global batch (balanced by estimated tokens, mezo/sharding.py), runs every branch of its shard (all perturbations of the step's
estimator, mezo/estimators.py) in one launch, and ONE all_reduce of a small float64 vector gives every
rank the same branch losses (hence the same projected gradients); the update, regenerated from the
shared seeds, is then bit-identical on every rank.

The vector has one slot per (branch, global example): each rank fills its own examples'
slots and leaves the rest zero, so the reduced vector holds exactly the per-example losses a single
process computes, and the batch mean is then taken in the same order as on one process (uneven shards
are weighted correctly by construction; x + 0 is exact). Two more slots carry the example count (a check
that the shards tile the batch) and a non-finite flag.

Perturbations are NOT spread over ranks: each rank runs every branch on its shard, so the result does not
depend on the number of ranks, and a run checkpointed with N ranks resumes with M ranks.

Only checkpoints add a collective (the consistency guard); evaluation adds one per evaluation.

The same vector carries each rank's compute seconds and tokens of the step (the step record's
`rank_seconds`/`rank_tokens`). With `MeZOConfig.shard_balance="throughput"` every rank turns them into
the same per-rank speeds (an average over steps) and the next shards are balanced by cost / speed, so
a rank on a busier core or a slower GPU gets fewer examples; the default "tokens" split ignores them.
"""
from __future__ import annotations

import hashlib
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from engine import Engine
from kernels.noise_cache import clear_noise_cache

from .config import MeZOConfig
from .estimators import LaunchPlan
from .objectives import EncodedExample, candidate_scores, generation_request, scoring_requests
from .sharding import balanced_shards, example_tokens, shard_range
from .trainer import MeZOTrainer

T = TypeVar("T")
BACKENDS = ("gloo", "nccl")


class RankMismatchError(RuntimeError):
    """The ranks' trainable tensors differ (the consistency guard at a checkpoint)."""


class RankFailedError(RuntimeError):
    """A step every rank must take (loading the model, resuming) failed on some ranks."""


@dataclass(frozen=True)
class DistContext:
    """The process group a data-parallel run uses. `comm_device` is where collective tensors live
    (CUDA for NCCL, CPU for gloo)."""

    rank: int
    world_size: int
    backend: str
    comm_device: torch.device

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone writes metrics, plots, checkpoints, the trajectory and the adapter."""
        return self.rank == 0


def current_context() -> DistContext | None:
    """The active process group as a DistContext, or None when there is none (a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    backend = str(dist.get_backend()).lower()
    comm = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return DistContext(dist.get_rank(), dist.get_world_size(), backend, comm)


def launched_by_torchrun() -> bool:
    """True when WORLD_SIZE/RANK are in the environment (torchrun, or a launcher that sets the same)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def local_device(device: str) -> str:
    """The device of this rank: "auto"/"cuda" becomes cuda:LOCAL_RANK when CUDA is present."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return device


def init_from_env(device: str = "auto", backend: str | None = None, timeout_s: float = 1800.0) -> str:
    """Join the process group torchrun describes (env:// rendezvous). Returns this rank's device.

    `backend` None picks gloo for CPU and nccl for CUDA. Raises ValueError for an unknown backend,
    or nccl on a CPU device.
    """
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"dist backend {backend!r}: must be one of {BACKENDS}")
    device = local_device(device)
    is_cuda = torch.device(device).type == "cuda"
    backend = backend or ("nccl" if is_cuda else "gloo")
    if backend == "nccl" and not is_cuda:
        raise ValueError(f"dist backend 'nccl' needs a CUDA device, got device={device!r}")
    if is_cuda:
        torch.cuda.set_device(torch.device(device))
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return device


@contextmanager
def process_group_from_env(device: str = "auto", backend: str | None = None) -> Iterator[tuple[DistContext | None, str]]:
    """Yields (context, this rank's device). Under torchrun it joins the process group (and leaves
    it on exit, if it joined); otherwise it yields the existing group's context, or (None, device)."""
    joined = False
    if launched_by_torchrun() and not (dist.is_available() and dist.is_initialized()):
        device = init_from_env(device, backend)
        joined = True
    try:
        yield current_context(), device
    except BaseException:
        if joined:
            dist.destroy_process_group()
        raise
    if joined:
        # every rank is done before any tears the group down (rank 0 hosts the rendezvous store;
        # leaving while another rank still talks to it can abort that rank's gloo threads)
        dist.barrier()
        dist.destroy_process_group()


def agree(ctx: DistContext | None, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on every rank and make sure it succeeded everywhere: one all_reduce of a failure
    flag per rank. Raises RankFailedError naming the failed ranks on EVERY rank (chained to the
    local error where there is one), so that no rank waits forever in a later collective."""
    if ctx is None:
        return fn()
    result, error = None, None
    try:
        result = fn()
    except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
        error = err
    failed = torch.zeros(ctx.world_size, dtype=torch.int64, device=ctx.comm_device)
    failed[ctx.rank] = int(error is not None)
    dist.all_reduce(failed)
    bad = [r for r, f in enumerate(failed.tolist()) if f]
    if bad:
        local = f": {type(error).__name__}: {error}" if error is not None else ""
        raise RankFailedError(f"{what} failed on rank(s) {bad} of {ctx.world_size}{local}") from error
    return result  # type: ignore[return-value]


def run_on_writer(ctx: DistContext, fn: Callable[[], T], what: str) -> T:
    """Run `fn` on rank 0 only and broadcast its (picklable) result; an error there is raised on every rank."""
    box: list[Any] = [None]
    if ctx.is_writer:
        try:
            box[0] = ("ok", fn())
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            box[0] = ("error", f"{type(err).__name__}: {err}", err)
    dist.broadcast_object_list(box, src=0, device=ctx.comm_device if ctx.backend == "nccl" else None)
    status = box[0]
    if status[0] == "error":
        if ctx.is_writer:
            raise status[2]
        raise RankFailedError(f"{what} failed on rank 0: {status[1]}")
    return status[1]


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> int:
    """A 63-bit digest of the names, shapes, dtypes and exact bytes of `tensors` (in their order)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


class DistributedMeZOTrainer(MeZOTrainer):
    """A MeZOTrainer whose steps and evaluations are sharded over the ranks of `ctx`.

    `step(examples)` takes the GLOBAL batch (the same list on every rank). Raises ValueError when the
    world size is larger than `config.batch_size` (a rank would have no example of each step).
    """

    def __init__(self, engine: Engine, config: MeZOConfig | None, ctx: DistContext):
        config = config or MeZOConfig()
        if ctx.world_size > config.batch_size:
            raise ValueError(f"MeZOConfig.batch_size={config.batch_size} is smaller than the world size "
                             f"{ctx.world_size}: every rank needs at least one example of each step's batch; "
                             f"raise batch_size or start fewer processes")
        super().__init__(engine, config)
        self.ctx = ctx
        self.rank_speeds: list[float] | None = None  # tokens/s per rank (shard_balance="throughput")
        self._rank_stats: tuple[list[float], list[int]] = ([], [])

    def shard(self, encoded: list[EncodedExample]) -> list[int]:
        """Ascending indices of this rank's examples of `encoded`: shards balanced by estimated tokens
        (mezo/sharding.py), weighted by `rank_speeds` under shard_balance="throughput" once a step has
        measured them; the same split on every rank. Empty for some ranks only when `encoded` has fewer
        examples than ranks (evaluation; a step refuses that)."""
        if len(encoded) < self.ctx.world_size:
            lo, hi = shard_range(len(encoded), self.ctx.rank, self.ctx.world_size)
            return list(range(lo, hi))
        speeds = self.rank_speeds if self.config.shard_balance == "throughput" else None
        return balanced_shards([example_tokens(ex) for ex in encoded], self.ctx.world_size, speeds)[self.ctx.rank]

    def _timing_sync(self, device: torch.device) -> None:
        """Under shard_balance="throughput" on CUDA, wait for the GPU, so that a rank's measured seconds
        are its GPU time; otherwise nothing (the default split never waits for the timing)."""
        if self.config.shard_balance == "throughput" and device.type == "cuda":
            torch.cuda.synchronize(device)

    def _measure_speeds(self, seconds: list[float], tokens: list[int]) -> None:
        """Fold one step's per-rank compute seconds and tokens (the same reduced values on every rank,
        so the same speeds everywhere) into `rank_speeds`: the mean of the last estimate and this one,
        which follows a core that turns slow for a few seconds within a step or two."""
        self._rank_stats = (seconds, tokens)
        if min(seconds) <= 0 or min(tokens) <= 0:
            return
        now = [t / s for t, s in zip(tokens, seconds)]
        old = self.rank_speeds
        self.rank_speeds = now if old is None else [(a + b) / 2 for a, b in zip(old, now)]

    # -- the step's one collective ----------------------------------------------------------------
    def launch_losses(self, encoded: list[EncodedExample], plan: LaunchPlan) -> torch.Tensor:
        """Every branch's batch-mean loss over the GLOBAL batch (per_example plans: the per-example
        losses [branches, batch]): this rank runs all branches of its shard in one launch, then one
        all_reduce gathers the per-example losses of every branch."""
        branches, batch = len(plan.branches), len(encoded)
        if batch < self.ctx.world_size:
            raise ValueError(f"a batch of {batch} examples cannot be sharded over {self.ctx.world_size} ranks")
        idx = self.shard(encoded)
        shard = [encoded[i] for i in idx]
        # slots: [branch, example] losses, then the example count, the non-finite flag, one failure
        # flag per rank (so a rank whose shard raised never leaves the others waiting in this
        # collective: every rank learns of it and raises), and per rank its compute seconds and tokens
        world = self.ctx.world_size
        buf = torch.zeros(branches * batch + 2 + 3 * world, dtype=torch.float64, device=self.ctx.comm_device)
        slots = buf[:branches * batch].view(branches, batch)
        tail = buf[branches * batch:]
        tokens_before = self.engine.runner.tokens_computed
        error: Exception | None = None
        self._timing_sync(buf.device)  # the previous update and this step's noise prefetch are done
        start = time.perf_counter()
        try:
            per_branch = self.run_plan(shard, plan, idx)  # per_example ids: global example indices
            for b, reqs in enumerate(per_branch):
                slots[b, idx] = self.example_losses(shard, reqs).to(buf.device, torch.float64)
            self._timing_sync(buf.device)  # the span is the GPU's compute, not the queueing
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
        except BaseException:  # an interrupt: torchrun stops every rank anyway
            clear_noise_cache()
            raise
        finally:
            self.engine.cache.reset()  # KV under perturbed weights is never reused, failed step or not
        local = slots[:, idx]
        tokens = self.engine.runner.tokens_computed - tokens_before
        tail[0] = len(idx)
        tail[1] = (~torch.isfinite(local)).any().to(torch.float64)
        tail[2 + self.ctx.rank] = float(error is not None)
        tail[2 + world + self.ctx.rank] = time.perf_counter() - start
        tail[2 + 2 * world + self.ctx.rank] = tokens
        dist.all_reduce(buf)
        # one host read of the flags and rank stats (data-parallel steps sync here as well as on the loss)
        stats = tail[2:].tolist()
        flags, seconds, rank_tokens = (stats[k * world:(k + 1) * world] for k in range(3))
        if error is not None or any(flags):
            clear_noise_cache()  # nothing of the failed step (its z) outlives it
            failed = [r for r, f in enumerate(flags) if f]
            local_msg = f": {type(error).__name__}: {error}" if error is not None else ""
            raise RankFailedError(f"MeZO step {self.step_count} failed on rank(s) {failed} of "
                                  f"{world}{local_msg}") from error
        self._measure_speeds(seconds, [int(t) for t in rank_tokens])
        # the shards tile the batch by construction; a wrong count would be a bug here, not user input
        count_ok = tail[0] == batch
        nan = torch.tensor(float("nan"), dtype=torch.float32, device=buf.device)
        # the batch mean as `MeZOTrainer._batch_loss` takes it: fp32 mean of fp32 losses; float64 for scores
        if plan.per_example:  # the estimator takes the per-example losses, as on one process
            mean = slots.float()
        elif self.config.objective in ("accuracy", "f1"):
            mean = (slots.sum(dim=-1) / batch).float()
        else:
            mean = slots.float().mean(dim=-1)
        losses = torch.where((tail[1] == 0) & count_ok, mean, nan)
        return losses.to(self.engine.device)

    def step(self, examples: Sequence[Any] | list[EncodedExample]) -> dict[str, Any]:
        """One data-parallel MeZO step on the GLOBAL batch; the record's tokens_computed counts every rank,
        rank_seconds/rank_tokens give each rank's compute time (s, until the all_reduce; on CUDA the GPU's
        only under shard_balance="throughput", else the host's queueing span) and tokens."""
        record = super().step(examples)
        record["tokens_computed"] = sum(self._rank_stats[1])
        record["rank_seconds"] = [round(x, 6) for x in self._rank_stats[0]]
        record["rank_tokens"] = self._rank_stats[1]
        return record

    # -- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, examples: Sequence[Any] | list[EncodedExample]) -> dict[str, Any]:
        """Sharded evaluation, gathered with one all_reduce; the same metrics as on one process."""
        encoded = self._encoded(examples)
        total = len(encoded)
        idx = self.shard(encoded)
        shard = [encoded[i] for i in idx]
        objective = self.config.objective
        buf = torch.zeros(2, total, dtype=torch.float64, device=self.ctx.comm_device)  # [value, correct]
        if shard:
            namespace = self.engine.namespace
            if objective in ("accuracy", "f1"):
                reqs = [[generation_request(self.engine, ex, 0.0, namespace, self.config.max_new_tokens)]
                        for ex in shard]
            else:
                reqs = [scoring_requests(self.engine, ex, 0.0, namespace) for ex in shard]
            self.engine.run_requests([r for group in reqs for r in group])
            losses = self.example_losses(shard, reqs).to(buf.device, torch.float64)
            buf[0, idx] = -losses if objective in ("accuracy", "f1") else losses  # scores, or losses
            if objective == "classification":
                buf[1, idx] = torch.tensor([float(int(candidate_scores(ex, r).argmax()) == ex.label)
                                              for ex, r in zip(shard, reqs)], dtype=torch.float64, device=buf.device)
        dist.all_reduce(buf)
        values = buf.cpu()
        if objective in ("accuracy", "f1"):
            return {objective: sum(values[0].tolist()) / total, "n": total}
        out: dict[str, Any] = {"loss": float(values[0].float().mean()), "n": total}
        if objective == "classification":
            out["accuracy"] = sum(values[1].tolist()) / total
        return out

    # -- checkpoints ----------------------------------------------------------------------------------
    def check_consistency(self) -> int:
        """The consistency guard: one all_reduce of each rank's checksum of its trainable tensors.
        Returns the checksum; raises RankMismatchError naming the ranks that differ from rank 0."""
        world = self.ctx.world_size
        sums = torch.zeros(world, dtype=torch.int64, device=self.ctx.comm_device)
        sums[self.ctx.rank] = tensors_checksum(self.params)
        dist.all_reduce(sums)
        values = sums.tolist()
        bad = [r for r in range(world) if values[r] != values[0]]
        if bad:
            raise RankMismatchError(
                f"trainable tensors differ across ranks at step {self.step_count}: rank(s) {bad} disagree with "
                f"rank 0 (checksums {[hex(v) for v in values]}); the run is stopped before this checkpoint is "
                f"written; resume from the last checkpoint")
        return values[0]

    def sync_trainable_from_writer(self) -> None:
        """Give every rank rank 0's trainable tensors (after rank 0 resumed from a checkpoint): one
        broadcast per tensor, only at start-up, so no shared filesystem is needed."""
        for param in self.params.values():
            buf = param.detach().to(self.ctx.comm_device).contiguous()
            dist.broadcast(buf, src=0)
            if not self.ctx.is_writer:
                param.copy_(buf.to(param.device))
        self.engine.weights_changed()


def make_trainer(engine: Engine, config: MeZOConfig | None = None) -> MeZOTrainer:
    """A DistributedMeZOTrainer inside a process group (of any size); a plain MeZOTrainer otherwise."""
    ctx = current_context()
    return MeZOTrainer(engine, config) if ctx is None else DistributedMeZOTrainer(engine, config, ctx)


def resume_on_writer(trainer: DistributedMeZOTrainer, resume: Callable[[], None], result: Any) -> None:
    """Rank 0 runs `resume` (load the latest checkpoint or start fresh; its files, its errors) and
    every rank takes the same state: step, skipped-step count, initial evaluation and, when a
    checkpoint was loaded, rank 0's trainable tensors. `result` is the run's TrainResult."""
    def on_writer() -> dict[str, Any]:
        resume()
        return {"step": trainer.step_count, "nonfinite_steps": trainer.nonfinite_steps,
                "initial_eval": result.initial_eval, "resumed_from": result.resumed_from}

    state = run_on_writer(trainer.ctx, on_writer, "resuming from the checkpoint")
    trainer.step_count, trainer.nonfinite_steps = state["step"], state["nonfinite_steps"]
    result.initial_eval, result.resumed_from = state["initial_eval"], state["resumed_from"]
    if state["resumed_from"] is not None:
        trainer.sync_trainable_from_writer()
