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


def _mb(nbytes: float | None) -> str:
    return "—" if nbytes is None else f"{nbytes / MB:.0f}"


def summary_table(scenarios: dict[str, Any]) -> str:
    rows = []
    for key, r in scenarios.items():
        b, e = r["baseline"], r["engine"]
        peaks = "/".join(_mb(dotted(r, f"{s}.memory.peak_bytes")) for s in ("baseline", "engine", "engine_forward"))
        rows.append([key, b["steps_per_s"], r["hf_loop"]["steps_per_s"], e["steps_per_s"], f"{_f(r['speedup'])}x",
                     f"{_f(r['speedup_vs_hf_loop'])}x", b["tokens_per_s"], e["tokens_per_s"],
                     f"{b['tokens_computed_per_step']} / {e['tokens_computed_per_step']}", r["zo_overhead"],
                     peaks + (" (ref: sub-batch)" if b.get("extrapolated_from_examples") else ""),
                     dotted(r, "memory.step_vs_inference_peak")])
    return "\n".join(md_table(rows, [
        "scenario", "ref steps/s", "hf-loop steps/s", "engine steps/s", "speedup vs ref", "speedup vs hf-loop",
        "ref tok/s", "engine tok/s", "tokens computed/step ref / engine", "ZO overhead",
        "peak MB ref/engine/engine inference", "mem step/inference"]))


def _details(r: dict[str, Any]) -> list[str]:
    """One scenario: its batch's facts, a row per contestant (time, then memory), then what else was measured."""
    facts = [f"trainable params {r['trainable_params']:,}",
             f"reference logits {r['reference_logits_bytes'] / 2**30:.2f} GiB per forward (full batch)",
             f"prompt tokens mean {r['prompt_tokens_mean']:.1f} / max {r['prompt_tokens_max']}",
             f"reference batch {r['reference_rows']} rows x {r['reference_width']} tokens",
             f"workload {r['workload_tokens_per_step']} tokens/step", f"engine KV pool {r['kv_pool_tokens']} tokens",
             *[text.format(r[key]) for key, text in (
                 ("target_tokens_mean", "target tokens mean {:.1f}"),
                 ("shared_prefix_tokens", "shared prefix {} tokens"),
                 ("single_token_candidates", "single-token candidates: {}")) if r.get(key) is not None]]
    srows = [[side, d["step_s"], d["steps_per_s"], d["tokens_per_s"], d["tokens_computed_per_step"], d["timed_steps"],
              ", ".join(_f(x) for x in d["step_s_all"]), ", ".join(_f(x) for x in d["warmup_s"]) or "—",
              *(_mb(d.get("memory", {}).get(k)) for k in ("peak_bytes", "delta_bytes", "heap_retained_bytes",
                                                          "noise_cache_bytes"))]
             for side, d in ((s, r[s]) for s in SIDES if s in r)]
    extra = [f"{text}: {_f(dotted(r, key))}" for key, text in (
        ("memory.step_vs_inference_peak", "peak memory engine step / engine inference on the same 2xB batch"),
        ("memory.engine_vs_baseline_peak", "peak memory engine step / reference step"),
        ("prefix_sharing_speedup", "prefix sharing: no-cache step / cached step")) if dotted(r, key) is not None]
    extra += r["notes"] + [f"load average before / after: {r['loadavg']['before']} / {r['loadavg']['after']}"]
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
    method = next((f"measured as {mm['method']}" for r in p["scenarios"].values()
                   if (mm := r["engine"].get("memory", {})).get("method")), "not measured (run with --memory)")
    lines = [
        f"Machine: {hw} ({m['device']}); torch threads: {s.get('torch_threads')}",
        f"Load average (1/5/15 min): {', '.join(f'{k} {v}' for k, v in p['loadavg'].items())}",
        f"Model {p['model']['name']} ({p['model']['params'] / 1e6:.1f} M parameters), {p['model']['dtype']}; "
        f"B = {s['batch_size']}; {s['steps']} timed step(s) per contestant after {s['warmup']} warm-up, "
        "contestants interleaved in one process with rotating order; median step time. "
        f"Whole run {p.get('wall_s', 0) / 60:.1f} min.",
        *[f"Note: {n}" for n in p.get("notes", [])], "", "## Results", "", summary_table(p["scenarios"]), "",
        "ref = `ReferenceMeZO` (bench/baselines/reference_mezo.py) on transformers + PEFT; hf-loop = `HFLoopMeZO` "
        "(bench/baselines/hf_loop.py), the loop a careful transformers user writes (padded SDPA forward per "
        "branch, LM head only at scored positions, one row per example for single-token candidates); engine = "
        "`MeZOTrainer.step`. tok/s = the workload's tokens (every reference row unpadded, both branches) per "
        "second, the same numerator for all; *tokens computed* = what each side pushed through the model per "
        "step (reference: padded rows x width x 2; engine: `runner.tokens_computed`). ZO overhead = engine "
        "step / the engine's plain unperturbed forward of the same 2xB requests. Peak memory: each contestant "
        f"built again in its own fresh process, warm-up calls, then one call measured, {method}; the engine's "
        "KV pool holds every sequence of the step unshared.", "", "## Targets", ""]
    trows = [[key, t["metric"], t["target"], t["value"], {True: "met", False: "MISSED", None: "not measured"}[t["met"]]]
             for key, r in p["scenarios"].items() for t in r["targets"]]
    lines += md_table(trows, ["scenario", "metric", "target", "value", "result"]) + ["", "## Details", ""]
    return "\n".join(lines + [line for r in p["scenarios"].values() for line in _details(r)])


def plot(p: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys, scen = list(p["scenarios"]), p["scenarios"]
    fig, ax = plt.subplots(figsize=(1.9 * len(keys) + 3, 4.2))
    for dx, side, label, color in ((-0.27, "baseline", "reference MeZO step (transformers + PEFT)", "#999999"),
                                   (0.0, "hf_loop", "careful transformers loop", "#ff7f0e"),
                                   (0.27, "engine", "MeZO Engine", "#1f77b4")):
        ax.bar([x + dx for x in range(len(keys))], [scen[k][side]["steps_per_s"] for k in keys], 0.27, label=label,
               color=color)
    for x, k in enumerate(keys):
        ax.annotate(f"{scen[k]['speedup']:.2f}x / {scen[k]['speedup_vs_hf_loop']:.2f}x",
                    (x + 0.27, scen[k]["engine"]["steps_per_s"]), ha="center", va="bottom", fontsize=8,
                    xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k + ("\n(reference extrapolated\nfrom a sub-batch)" if scen[k]["baseline"]
                             .get("extrapolated_from_examples") else "") for k in keys], fontsize=9)
    ax.set_ylabel("MeZO steps / s (higher is better)")
    rates = [scen[k][side]["steps_per_s"] for k in keys for side in ("baseline", "hf_loop", "engine")]
    if max(rates) / min(rates) > 30:
        ax.set_yscale("log")
    ax.set_title(f"MeZO step throughput, B={p['settings']['batch_size']}, {p['model']['name']} "
                 f"{p['model']['dtype']} on {p['meta']['device_name']}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
