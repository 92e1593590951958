"""Run benchmark stages as subprocesses with time budgets, a progress bar and a summary table.

Shared by `mezo-engine bench` (bench/suite.py) and bench/gpu_suite.py. A stage is a command line
(a bench script or pytest) plus how to read its figures back from the JSON it wrote; each runs in its
own process (a crash or an overrun never takes the suite down) and is killed when it exceeds its
budget, after which the suite goes on and the table still prints.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Target:
    """One figure a stage reports: where it is in the stage's JSON and what it should reach."""

    label: str
    json_glob: str          # file under the out dir, e.g. "kernels_*.json"
    path: str               # dotted path inside it, e.g. "figures.fused_over_plain_r8"
    op: str = ""            # ">=" | "<=" | "" (reported only)
    threshold: float | None = None

    def evaluate(self, out_dir: Path, since: float = 0.0) -> tuple[Any, bool | None]:
        """(value, met) from the newest matching file written after `since` (epoch s): never a stale one."""
        files = sorted((p for p in out_dir.glob(self.json_glob) if p.stat().st_mtime >= since),
                       key=lambda p: p.stat().st_mtime)
        if not files:
            return None, None
        cur: Any = json.loads(files[-1].read_text())
        for part in self.path.split("."):
            cur = cur.get(part) if isinstance(cur, dict) else None
        if not isinstance(cur, (int, float)) or self.threshold is None:
            return cur, None
        return cur, (cur >= self.threshold if self.op == ">=" else cur <= self.threshold)


@dataclass
class Stage:
    name: str
    argv: list[str]                       # run from the repository root
    budget_s: float
    targets: list[Target] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ok_codes: tuple[int, ...] = (0,)


@dataclass
class StageResult:
    name: str
    status: str                           # "ok" | "failed (rc N)" | "over budget ..., stopped"
    seconds: float
    log: str
    started: float = 0.0                  # epoch seconds


def run_stage(stage: Stage, log_dir: Path) -> StageResult:
    """Run one stage; its output goes to <log_dir>/<name>.log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{stage.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    t0, started = time.perf_counter(), time.time()
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(stage.argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(stage.argv, cwd=REPO_ROOT, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=stage.budget_s)
            status = "ok" if rc in stage.ok_codes else f"failed (rc {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the stage's own process group: it and its workers, nothing else
            proc.wait()
            status = f"over budget ({stage.budget_s:.0f} s), stopped"
    return StageResult(stage.name, status, time.perf_counter() - t0, str(log), started)


def run_stages(stages: list[Stage], out_dir: Path, progress: bool = True,
               on_done: Callable[[StageResult], None] | None = None) -> list[StageResult]:
    from tqdm.auto import tqdm

    results = []
    bar = tqdm(stages, desc="bench", unit="stage", disable=not progress, file=sys.stderr)
    for stage in bar:
        bar.set_postfix_str(stage.name)
        res = run_stage(stage, out_dir / "logs")
        results.append(res)
        if on_done:
            on_done(res)
    return results


def summary(stages: list[Stage], results: list[StageResult], out_dir: Path,
            judge: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """A one-screen table: each figure, its target, met / MISSED / not measured (judge=False: toy
    figures, shown without a verdict); then each stage's status."""
    by_name = {r.name: r for r in results}
    rows: list[dict[str, Any]] = []
    for st in stages:
        res = by_name.get(st.name)
        for t in st.targets:
            value, met = t.evaluate(out_dir, res.started) if res is not None else (None, None)
            rows.append({"stage": st.name, "figure": t.label, "value": value,
                         "target": f"{t.op} {t.threshold:g}" if t.threshold is not None else "",
                         "result": ({True: "met", False: "MISSED", None: "—"}[met] if judge else "(toy size)")
                         if value is not None else "not measured"})
    w = max([len(r["figure"]) for r in rows] + [6])
    lines = [f"{'figure':<{w}}  {'value':>10}  {'target':>8}  result", "-" * (w + 36)]
    for r in rows:
        v = r["value"]
        vs = f"{v:10.4g}" if isinstance(v, (int, float)) else f"{'—':>10}"
        lines.append(f"{r['figure']:<{w}}  {vs}  {r['target']:>8}  {r['result']}")
    lines += ["", "stages: " + "; ".join(f"{r.name} {r.status} in {r.seconds:.0f} s" for r in results)]
    return "\n".join(lines), rows
