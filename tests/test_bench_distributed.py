"""bench/bench_distributed.py end to end at toy size on the CPU: the single process, a 1-rank group under
torchrun (the path `--device cuda --ranks 1 --backend nccl` takes on a GPU, here on gloo), 2 ranks with
the throughput split, synthetic headlines; the result files carry the rows, every timed step's split
and the run's metadata."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_distributed_quick_runs_every_contestant(tmp_path):
    cmd = [sys.executable, "bench/bench_distributed.py", "--quick", "--ranks", "1", "2", "--backend", "gloo",
           "--balances", "throughput", "--no-ceiling", "--rounds", "1", "--steps", "2", "--warmup", "1",
           "--tokenizer", "synthetic", "--out-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "distributed_cpu_quick.json").read_text())
    rows = {r["kind"]: r for r in payload["results"]}
    assert list(rows) == ["single process", "1 rank, tokens split", "2 ranks, throughput split"]
    assert rows["single process"]["backend"] is None and rows["1 rank, tokens split"]["backend"] == "gloo"
    two = rows["2 ranks, throughput split"]
    assert two["shard_balance"] == "throughput" and len(two["examples_per_step_per_rank"]) == 2
    # rank 0 logs every timed step's tokens per rank; both ranks' shards tile the synthetic batch
    assert len(two["rank_tokens_per_step"]) == 2 and all(sum(t) == two["tokens_computed_per_step"]
                                                          for t in two["rank_tokens_per_step"])
    assert all(a + b == 16 for a, b in zip(*two["examples_per_step_per_rank"]))
    assert [t["metric"] for t in payload["targets"]] == ["2-rank scaling, throughput split"]
    assert payload["meta"]["command"].startswith("python bench/bench_distributed.py --quick")
    assert "2 ranks, throughput split" in (tmp_path / "distributed_cpu_quick.md").read_text()
