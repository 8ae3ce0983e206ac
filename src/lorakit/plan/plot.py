"""A small picture of a run: training and held-out loss, with the diagnosis marked."""

from __future__ import annotations

import math
import os
from pathlib import Path

from lorakit.plan.diagnosis import Diagnosis

__all__ = ["plot_diagnosis"]

_COLOURS = {"healthy": "tab:green", "inconclusive": "tab:gray"}


def plot_diagnosis(diagnosis: Diagnosis, path: str | os.PathLike) -> Path:
    """Write a PNG of the loss curves with the verdict in the title and the marked step drawn;
    written to a temporary file and renamed, so a reader never sees half a picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics, path = diagnosis.metrics, Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    steps = [p.step for p in metrics.train if math.isfinite(p.loss)]
    losses = [p.loss for p in metrics.train if math.isfinite(p.loss)]
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="training loss")
    if len(losses) >= 10:  # a moving average shows the trend under the noise
        k = max(2, len(losses) // 20)
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1])
                  for i in range(len(losses))]
        ax.plot(steps, smooth, color="tab:blue", linewidth=1.8, label=f"training (mean of {k})")
    evals = [e for e in metrics.evals if math.isfinite(e.eval_loss)]
    if evals:
        ax.plot([e.step for e in evals], [e.eval_loss for e in evals], "o-", color="tab:orange",
                markersize=4, label="held-out loss")
    bad = diagnosis.stats.get("non_finite_steps") or []
    if bad and losses:
        ax.plot(bad, [max(losses)] * len(bad), "x", color="tab:red", label="NaN / Inf")
    colour = _COLOURS.get(diagnosis.verdict, "tab:red")
    if diagnosis.marker_step is not None:
        ax.axvline(diagnosis.marker_step, color=colour, linestyle="--", linewidth=1.2,
                   label=f"step {diagnosis.marker_step}")
    ax.set_title(f"{diagnosis.verdict.replace('_', ' ')}: {diagnosis.summary}", fontsize=10,
                 color=colour)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
