"""Targets, tables, markdown and the bar chart of bench_mezo.py's results."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import dotted, md_cell as _f, md_table, meets

# (metric, op, threshold) per device type and scenario; "*" applies to every scenario.
TARGETS: dict[str, dict[str, list[tuple[str, str, float]]]] = {
    "cpu": {
        "cls": [("speedup", ">=", 1.5), ("speedup_vs_hf_loop", ">=", 1.5)],
        "cls_16shot": [("speedup", ">=", 5.0), ("prefix_sharing_speedup", ">=", 4.0)],
        "*": [("memory.step_vs_inference_peak", "<=", 1.2)],
    },
    "cuda": {
        "cls": [("speedup", ">=", 4.0)],
        "cls_16shot": [("speedup", ">=", 10.0)],
        "*": [("zo_overhead", "<=", 1.05), ("memory.step_vs_inference_peak", "<=", 1.2)],
    },
}
SIDES = ("baseline", "hf_loop", "engine", "engine_forward", "engine_no_prefix_cache")
MB = 2**20


def evaluate_targets(res: dict[str, Any], key: str, device_type: str) -> None:
    """res["targets"]: each target with its value and met = True / False / None (not measured)."""
    table = TARGETS.get(device_type, TARGETS["cpu"])
    res["targets"] = [{"metric": metric, "target": f"{op} {thr:g}", "value": dotted(res, metric),
                       "met": meets(dotted(res, metric), op, thr)}
                      for metric, op, thr in table.get(key, []) + table.get("*", [])]


def _mb(m: dict[str, Any] | None) -> str:
    return f"{m['peak_bytes'] / MB:.0f}" if m and "peak_bytes" in m else "—"


def _x(v: float | None) -> str:
    return "—" if v is None else _f(v) + "x"


def summary_rows(scenarios: dict[str, Any]) -> tuple[list[list[Any]], list[str]]:
    header = ["scenario", "ref steps/s", "hf-loop steps/s", "engine steps/s", "speedup vs ref",
              "speedup vs hf-loop", "ref tok/s", "engine tok/s", "tokens computed/step ref / engine",
              "ZO overhead", "peak MB ref/engine/engine inference", "mem step/inference"]
    rows = []
    for key, r in scenarios.items():
        b, e = r.get("baseline", {}), r.get("engine", {})
        peaks = "/".join(_mb(r.get(side, {}).get("memory")) for side in ("baseline", "engine", "engine_forward"))
        rows.append([key, _f(b.get("steps_per_s")), _f(r.get("hf_loop", {}).get("steps_per_s")),
                     _f(e.get("steps_per_s")) if e else "skipped", _x(r.get("speedup")), _x(r.get("speedup_vs_hf_loop")),
                     _f(b.get("tokens_per_s")), _f(e.get("tokens_per_s")),
                     f"{_f(b.get('tokens_computed_per_step'))} / {_f(e.get('tokens_computed_per_step'))}",
                     _f(r.get("zo_overhead")), peaks + (" (ref: sub-batch)" if b.get("extrapolated_from_examples") else ""),
                     _f(dotted(r, "memory.step_vs_inference_peak"))])
    return rows, header


def summary_table(scenarios: dict[str, Any]) -> str:
    return "\n".join(md_table(*summary_rows(scenarios)))


def _details(r: dict[str, Any]) -> list[str]:
    """One scenario: its batch's facts, a row per contestant (time, then memory), then what else was measured."""
    facts = [f"trainable params {r['trainable_params']:,}",
             f"reference logits {r.get('reference_logits_bytes', 0) / 2**30:.2f} GiB per forward (full batch)",
             f"prompt tokens mean {r['prompt_tokens_mean']:.1f} / max {r['prompt_tokens_max']}",
             f"reference batch {r['reference_rows']} rows x {r['reference_width']} tokens",
             f"workload {r['workload_tokens_per_step']} tokens/step", f"engine KV pool {r['kv_pool_tokens']} tokens"]
    for key, text in (("target_tokens_mean", "target tokens mean {:.1f}"), ("shared_prefix_tokens", "shared prefix {} tokens"),
                      ("single_token_candidates", "single-token candidates: {}")):
        if r.get(key) is not None:
            facts.append(text.format(r[key]))
    mb = lambda x: "—" if x is None else f"{x / MB:.0f}"  # noqa: E731
    srows = [[side, d["step_s"], d["steps_per_s"], d["tokens_per_s"], d["tokens_computed_per_step"], d["timed_steps"],
              ", ".join(_f(x) for x in d["step_s_all"]),
              ", ".join(_f(x) for x in d["warmup_s"]) or ("(first call timed)" if d["first_call_timed"] else "—"),
              _mb(d["memory"]), f"+{d['memory']['delta_bytes'] / MB:.0f}", mb(d["memory"]["heap_retained_bytes"]),
              mb(d["memory"]["noise_cache_bytes"])] for side, d in ((s, r[s]) for s in SIDES if s in r)]
    mem = r["memory"]
    extra = [f"peak memory engine step / engine inference on the same 2xB batch: {mem['step_vs_inference_peak']:.3f}"]
    if "engine_vs_baseline_peak" in mem:
        extra.append(f"peak memory engine step / reference step: {mem['engine_vs_baseline_peak']:.3f}")
    if "prefix_sharing_speedup" in r:
        extra.append(f"prefix sharing: no-cache step / cached step = {r['prefix_sharing_speedup']:.2f}x")
    extra += r.get("notes", []) + [f"load average before / after: {r['loadavg']['before']} / {r['loadavg']['after']}"]
    return [f"### {r['title']}", "", "; ".join(facts) + ".", "",
            *md_table(srows, ["contestant", "step s (median)", "steps/s", "tok/s", "tokens computed/step", "timed",
                              "all step s", "warm-up s", "peak MB", "MB over the level before the step",
                              "glibc heap trimmed before the call, MB", "kernels.noise_cache after the call, MB"]),
            "", *[f"- {x}" for x in extra], "",
            *[line for s in SIDES if "profile" in r.get(s, {}) for line in (
                f"torch.profiler, one {s} call, ops by self CPU time:", "", "```", r[s]["profile"], "```", "")]]


def to_markdown(p: dict[str, Any]) -> str:
    m, s = p["meta"], p["settings"]
    hw = m.get("gpu_name") or f"{m['cpu_model']}, {m['cpu_cores_usable']} cores"
    method = next((f"measured as {mm['method']}" for r in p["scenarios"].values() for side in ("baseline", "engine")
                   if (mm := r.get(side, {}).get("memory", {})).get("method")), "not measured")
    lines = [
        f"Machine: {hw} ({m['device']}); torch threads: {s.get('torch_threads')}",
        f"Load average (1/5/15 min): {', '.join(f'{k} {v_}' for k, v_ in p['loadavg'].items())}",
        f"Model {p['model']['name']} ({p['model']['params'] / 1e6:.1f} M parameters), {p['model']['dtype']}; "
        f"B = {s['batch_size']}; {s['steps']} timed step(s) per contestant after {s['warmup']} warm-up, "
        f"contestants interleaved in one process with rotating order; median step time. Whole run {p.get('wall_s', 0) / 60:.1f} min.",
        *[f"Note: {n}" for n in p.get("notes", [])], "", "## Results", "", summary_table(p["scenarios"]), "",
        "ref = `ReferenceMeZO` (bench/baselines/reference_mezo.py) on transformers + PEFT; hf-loop = "
        "`HFLoopMeZO` (bench/baselines/hf_loop.py), the loop a careful transformers user writes (padded SDPA "
        "forward per branch, LM head only at scored positions, one row per example for single-token "
        "candidates); engine = `MeZOTrainer.step`. tok/s = the workload's tokens (every reference row "
        "unpadded, both branches) per second, the same numerator for both sides; *tokens computed* = what "
        "each side pushed through the model per step (reference: padded rows x width x 2; engine: "
        "`runner.tokens_computed`). ZO overhead = engine step / the engine's plain unperturbed forward of the "
        "same 2xB requests. Peak memory: each contestant is built again in its own fresh process, makes its "
        "warm-up calls, then one call is measured, " + method + "; the engine's KV pool is sized to hold every sequence of the step unshared.",
        "", "## Targets", ""]
    trows = [[key, t["metric"], t["target"], t["value"], {True: "met", False: "MISSED", None: "not measured"}[t["met"]]]
             for key, r in p["scenarios"].items() for t in r.get("targets", [])]
    lines += md_table(trows, ["scenario", "metric", "target", "value", "result"]) if trows else ["(none)"]
    lines += ["", "## Details", ""]
    for r in p["scenarios"].values():
        lines += _details(r)
    return "\n".join(lines)


def plot(p: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = list(p["scenarios"])
    fig, ax = plt.subplots(figsize=(1.9 * len(keys) + 3, 4.2))
    xs = range(len(keys))
    bars = {}
    for dx, side, label, color in ((-0.27, "baseline", "reference MeZO step (transformers + PEFT)", "#999999"),
                                   (0.0, "hf_loop", "careful transformers loop", "#ff7f0e"),
                                   (0.27, "engine", "MeZO Engine", "#1f77b4")):
        bars[side] = [p["scenarios"][k].get(side, {}).get("steps_per_s", 0.0) for k in keys]
        ax.bar([x + dx for x in xs], bars[side], 0.27, label=label, color=color)
    base, loop, eng = bars["baseline"], bars["hf_loop"], bars["engine"]
    for x, k, e in zip(xs, keys, eng):
        r = p["scenarios"][k]
        ax.annotate(f"{r['speedup']:.2f}x / {r['speedup_vs_hf_loop']:.2f}x", (x + 0.27, e if e else 0), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([k + ("\n(reference extrapolated\nfrom a sub-batch)" if p["scenarios"][k].get("baseline", {})
                              .get("extrapolated_from_examples") else "") for k in keys], fontsize=9)
    ax.set_ylabel("MeZO steps / s (higher is better)")
    if any(base) and any(eng) and max(base + loop + eng) / max(min(v for v in base + eng if v > 0), 1e-12) > 30:
        ax.set_yscale("log")
    ax.set_title(f"MeZO step throughput, B={p['settings']['batch_size']}, {p['model']['name']} "
                 f"{p['model']['dtype']} on {p['meta']['device_name']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
