"""How a data-parallel step splits its global batch over the ranks (mezo/distributed.py).

A rank's step time is close to an affine function of the tokens it computes (its matmuls have as many
rows as tokens), so shards are balanced by an estimate of tokens, not by example count: with count
shards one rank computes more tokens than the other and every rank waits for it at the step's
all_reduce. A shard need not be contiguous, and every rank gets at least one example. Which rank
computes an example never changes the result: the per-example losses land in slots indexed by example
and the batch mean is taken in example order (mezo/distributed.py).

Every rank computes the same shards from the same (global) batch: integer arithmetic only.
"""
from __future__ import annotations

import math
from typing import Sequence

from .objectives import EncodedExample


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous shard of n items by count; sizes differ by at most one (the first
    n % world_size ranks take one more)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def example_tokens(ex: EncodedExample) -> int:
    """Tokens one branch of a step computes for `ex` (an estimate the shards are balanced by): the
    prompt, plus every candidate token when some candidate has more than one (those run as their own
    requests after the prompt; single-token candidates are scored from the prompt's last position), or
    the target (LM). Generation adds its decode steps, which every rank runs for its whole shard at
    once, so they are not counted."""
    tokens = len(ex.prompt)
    if ex.candidates is not None and not ex.single_token:
        tokens += sum(len(c) for c in ex.candidates)
    if ex.target is not None and ex.candidates is None:
        tokens += len(ex.target)
    return tokens


def balanced_shards(costs: Sequence[int], world_size: int,
                    speeds: Sequence[float] | None = None) -> list[list[int]]:
    """Per rank, the ascending indices of its examples: a split of range(len(costs)) into world_size
    non-empty shards that finish together (greedy: the costliest example first, each to the rank that
    would finish it first, i.e. the smallest (load + cost) / speed, ties to the lower rank; with equal
    speeds the largest sum is at most 4/3 of the best split's).

    `costs` are non-negative ints (e.g. `example_tokens`). `speeds` (one finite float > 0 per rank,
    e.g. measured tokens/s; None: all equal) weights ranks that compute at different rates
    (DistributedMeZOTrainer's shard_balance="throughput"). Raises ValueError when world_size < 1, when
    there are fewer items than ranks, for a negative or non-int cost, or for bad speeds.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be an int >= 1")
    n = len(costs)
    if n < world_size:
        raise ValueError(f"{n} items cannot be sharded over {world_size} ranks (every rank needs one)")
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ValueError(f"costs[{i}]={c!r} must be an int >= 0")
    if speeds is None:
        speeds = [1.0] * world_size
    if len(speeds) != world_size:
        raise ValueError(f"{len(speeds)} speeds for {world_size} ranks")
    for r, v in enumerate(speeds):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"speeds[{r}]={v!r} must be a finite number > 0")
    shards: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for left, i in enumerate(sorted(range(n), key=lambda j: (-costs[j], j))):
        empty = [q for q in range(world_size) if not shards[q]]
        # as many items left as empty ranks: each of the rest must open an empty shard
        pool = empty if len(empty) == n - left else range(world_size)
        r = min(pool, key=lambda q: ((loads[q] + costs[i]) / speeds[q], len(shards[q]) > 0, q))
        shards[r].append(i)
        loads[r] += costs[i]
    return [sorted(s) for s in shards]
