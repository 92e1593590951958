"""`mezo-engine bench --quick` and `mezo-engine bench --gpu --dry-run` run end to end (issue 15, issue 10 item 6),
and the stage runner stops a stage that overruns its budget while still reporting the others."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.suite import Stage, Target, run_stages, summary  # noqa: E402
from engine.cli import build_parser  # noqa: E402


def test_help_lists_the_three_commands_with_examples(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = capsys.readouterr().out
    for cmd in ("generate", "finetune", "bench", "mezo-engine bench --quick"):
        assert cmd in text


def test_stage_over_budget_is_stopped_and_reported(tmp_path):
    (tmp_path / "fig.json").write_text(json.dumps({"figures": {"x": 2.0}}))  # stale: before the stage ran
    slow = Stage("slow", [sys.executable, "-c", "import time; time.sleep(60)"], budget_s=1,
                 targets=[Target("x", "fig.json", "figures.x", ">=", 1.0)])
    fast = Stage("fast", [sys.executable, "-c", "import json,sys; json.dump({'figures': {'y': 0.5}}, "
                          f"open({str(tmp_path / 'y.json')!r}, 'w'))"], budget_s=60,
                 targets=[Target("y", "y.json", "figures.y", ">=", 1.0)])
    results = run_stages([slow, fast], tmp_path, progress=False)
    assert results[0].status.startswith("over budget") and results[0].seconds < 30
    assert results[1].status == "ok"
    table, rows = summary([slow, fast], results, tmp_path)
    assert rows[0]["result"] == "not measured"          # the stale file is not read as this run's figure
    assert rows[1]["value"] == 0.5 and rows[1]["result"] == "MISSED"
    assert "slow over budget" in table


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_bench_quick_writes_results_with_metadata(tmp_path):
    proc = _run([sys.executable, "-m", "engine.cli", "bench", "--quick", "--out", str(tmp_path), "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MeZO step: engine vs careful transformers loop" in proc.stdout
    assert "not measured" not in proc.stdout  # every stage's figure was read back from its own JSON
    files = sorted(tmp_path.glob("*.json"))
    assert {f.name.split("_")[0] for f in files} >= {"kernels-quick", "attention-quick", "generate", "mezo"}
    for f in files:
        meta = json.loads(f.read_text())["meta"]
        assert meta["command"].startswith("python bench/") and meta["date"] and meta["device"] == "cpu"
        assert "commit" in meta and meta["torch"]
        assert meta["command"] in f.with_suffix(".md").read_text()


def test_gpu_suite_dry_run_starts_every_stage(tmp_path):
    proc = _run([sys.executable, "-m", "engine.cli", "bench", "--gpu", "--dry-run", "--out", str(tmp_path), "--no-progress"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_suite_summary.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["tests", "kernels", "attention", "mezo", "generate", "sign",
                                                         "estimators"]
    assert all(s["status"] == "ok" for s in report["stages"])
    labels = [r["figure"] for r in report["figures"]]
    assert any("sign agreement" in x for x in labels) and any("copy bandwidth" in x for x in labels)
    measured = {r["figure"].strip(): r["value"] for r in report["figures"]}
    assert measured["bf16 estimator sign agreement"] is not None   # toy-size runs produced their JSON
    assert "DRY RUN" in proc.stdout and proc.stdout.rstrip().splitlines()[-1].startswith("whole suite")
