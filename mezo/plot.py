"""A PNG of the training loss and the evaluation metrics, from metrics.jsonl (written atomically)."""
from __future__ import annotations

import io
from pathlib import Path

from .checkpoint import atomic_write_bytes, read_jsonl


def plot_training(metrics_path: Path, png_path: Path) -> Path | None:
    from .optional import require

    matplotlib = require("matplotlib", "the training plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not Path(metrics_path).is_file():
        return None
    records = read_jsonl(metrics_path)
    train = [r for r in records if r.get("kind") == "train" and not r.get("skipped")]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        steps = [r["step"] for r in train]
        losses = [r["loss"] for r in train]
        ax[0].plot(steps, losses, lw=0.6, alpha=0.4, label="batch loss")
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                  for i in range(len(losses))]
        ax[0].plot(steps, smooth, lw=1.5, label=f"mean of {window}")
    ax[0].set(xlabel="step", ylabel="loss (mean of ±ε branches)", title="MeZO training loss")
    ax[0].legend()
    metric = next((k for k in ("accuracy", "f1", "loss") if evals and k in evals[0]), None)
    if metric:
        ax[1].plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
    ax[1].set(xlabel="step", ylabel=metric or "", title=f"held-out {metric or 'metric'}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())  # a kill mid-write leaves the old plot, never half a PNG
    return Path(png_path)
