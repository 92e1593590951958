"""Token-balanced shards of a data-parallel step (mezo/sharding.py): a partition of the batch, every
rank non-empty, never worse balanced than count shards on the benchmark's costs, weighted by measured
rank speeds when given, and clear errors."""
import itertools
import random

import pytest

from mezo.objectives import EncodedExample
from mezo.sharding import balanced_shards, example_tokens, shard_range


def _best_max(costs: list[int], world: int) -> int:
    """The smallest largest-shard sum over all assignments (brute force, small inputs only)."""
    best = sum(costs)
    for owner in itertools.product(range(world), repeat=len(costs)):
        if len(set(owner)) == world:
            best = min(best, max(sum(c for c, o in zip(costs, owner) if o == r) for r in range(world)))
    return best


def test_shards_partition_the_batch_and_are_balanced():
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 7)
        world = rng.randint(1, min(n, 3))
        costs = [rng.randint(0, 30) for _ in range(n)]
        shards = balanced_shards(costs, world)
        assert len(shards) == world and all(shards) and all(s == sorted(s) for s in shards)
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert balanced_shards(costs, world) == shards  # deterministic: every rank computes the same split
        worst = max(sum(costs[i] for i in s) for s in shards)
        assert 3 * worst <= 4 * _best_max(costs, world)  # greedy LPT's bound


def test_benchmark_headlines_split_evenly():
    # the prompt token counts of the benchmark's 16 BBC headlines (SmolLM2 tokenizer): count shards
    # give 108 / 99 tokens per branch, token shards 104 / 103
    costs = [15, 13, 13, 14, 20, 10, 12, 11, 14, 13, 11, 10, 12, 10, 15, 14]
    by_count = [sum(costs[shard_range(16, r, 2)[0]:shard_range(16, r, 2)[1]]) for r in range(2)]
    by_tokens = [sum(costs[i] for i in s) for s in balanced_shards(costs, 2)]
    assert by_count == [108, 99] and sorted(by_tokens) == [103, 104]


def test_speeds_weight_the_split():
    costs = [15, 13, 13, 14, 20, 10, 12, 11, 14, 13, 11, 10, 12, 10, 15, 14]
    assert balanced_shards(costs, 2, [2.5, 2.5]) == balanced_shards(costs, 2)  # equal speeds: the token split
    for fast in (1.5, 3.0):
        loads = [sum(costs[i] for i in s) for s in balanced_shards(costs, 2, [1.0, fast])]
        # rank 1 gets about `fast` times rank 0's tokens: the finish times differ by < one example's cost
        assert abs(loads[0] - loads[1] / fast) <= max(costs), loads
        assert loads[1] > loads[0]
    rng = random.Random(1)
    for _ in range(200):  # however skewed the speeds, every rank keeps an example
        n = rng.randint(1, 9)
        world = rng.randint(1, min(n, 4))
        speeds = [10 ** rng.uniform(-6, 6) for _ in range(world)]
        shards = balanced_shards([rng.randint(0, 30) for _ in range(n)], world, speeds)
        assert all(shards) and sorted(i for s in shards for i in s) == list(range(n))


def test_example_tokens():
    assert example_tokens(EncodedExample([1, 2, 3], candidates=[[4], [5]], label=0)) == 3  # scored at the prompt's end
    assert example_tokens(EncodedExample([1, 2, 3], candidates=[[4, 6], [5]], label=0)) == 6
    assert example_tokens(EncodedExample([1, 2], target=[7, 8, 9])) == 5


@pytest.mark.parametrize("costs, world, match", [
    ([1, 2], 3, "2 items cannot be sharded over 3 ranks"), ([1, 2], 0, "world_size=0"),
    ([1, -2], 1, r"costs\[1\]=-2"), ([1, 2.5], 1, r"costs\[1\]=2.5"), ([1], True, "world_size=True")])
def test_bad_input(costs, world, match):
    with pytest.raises(ValueError, match=match):
        balanced_shards(costs, world)


@pytest.mark.parametrize("speeds, match", [
    ([1.0], "1 speeds for 2 ranks"), ([1.0, 0.0], r"speeds\[1\]=0.0"), ([float("nan"), 1.0], r"speeds\[0\]=nan"),
    ([1.0, True], r"speeds\[1\]=True")])
def test_bad_speeds(speeds, match):
    with pytest.raises(ValueError, match=match):
        balanced_shards([1, 2, 3], 2, speeds)
