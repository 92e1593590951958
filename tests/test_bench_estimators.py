"""Smoke test of bench/bench_estimators.py: a --quick run on a tiny random model writes sane results."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import bench_estimators  # noqa: E402


def test_quick_run_writes_consistent_results(tmp_path):
    payload = bench_estimators.main(["--quick", "--device", "cpu", "--threads", "1", "--out-dir", str(tmp_path)])
    [jpath] = list(tmp_path.glob("estimators_cpu_quick.json"))
    assert jpath.with_suffix(".md").is_file()
    data = json.loads(jpath.read_text())
    assert data == json.loads(json.dumps(payload))  # what was returned is what was saved
    # headlines share no prompt: all 2n branches of the step are one launch
    assert data["config"]["n"] == 2 and data["launches_per_step"] == 1
    t_n, t_1 = data["seconds_n_one_launch"], data["seconds_one_perturbation"]
    assert t_n > 0 and t_1 > 0 and data["cost_ratio_n_vs_1"] == t_n / t_1
