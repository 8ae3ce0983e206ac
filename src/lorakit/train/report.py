"""What a run leaves for people: metrics.jsonl, loss.png and report.md."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog", "read_metrics", "loss_curves", "plot_losses", "write_report", "read_data_summary"]

DATA_SUMMARY_TITLE = "Data summary (before training):"
"""The line of report.md before the data summary's block (`write_report`, `read_data_summary`)."""


class MetricsLog:
    """Appends one JSON object per line to ``metrics.jsonl`` and flushes it, so that an
    interrupted run keeps every line it logged; every line also goes to the run's experiment
    trackers (`lorakit.train.tracking.Trackers`), if any."""

    def __init__(self, path: Path, enabled: bool = True, trackers: Any = None):
        self.path = Path(path)
        self.enabled = enabled
        """False on every rank but the first of a run on several processes: only rank 0 writes."""
        self.trackers = trackers
        """`Trackers` (--report-to): TensorBoard, MLflow, trackio; None: none."""
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, kind: str, **values: Any) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, **{k: _finite_or_none(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.trackers is not None:
            self.trackers.log(kind, record.get("step", 0), record)

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines logged after the checkpoint's step (they will be logged again)."""
        if self.enabled and self.trackers is not None:
            self.trackers.truncate_after(step)
        if not self.enabled or not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def loss_curves(metrics: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(training loss, held-out loss) of metrics.jsonl's records as (step, value) points; a value
    that is missing or not a finite number (a spoiled file) is left out."""
    def points(kind: str, key: str) -> list[tuple[int, float]]:
        return [(m["step"], m[key]) for m in metrics if m.get("kind") == kind and _finite(m.get(key))]
    return points("train", "loss"), points("eval", "eval_loss")


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def plot_losses(metrics: list[dict], path: Path, title: str = "",
                ylabel: str = "cross-entropy per answer token") -> Path:
    """Training loss (and held-out loss, if any) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, heldout = loss_curves(metrics)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss", color="tab:blue", linewidth=1.2)
    if heldout:
        ax.plot(*zip(*heldout), label="held-out loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _score_rows(before: dict | None, after: dict | None, started_from: str | None = None) -> list[str]:
    if not after and not before:
        return ["Task score: not measured (score_examples=0)."]
    keys = list((after or before)["fields"])
    first = f"starting adapter (`{started_from}`)" if started_from else "untuned model"
    rows = [f"| | {first} | with the adapter |", "|---|---|---|"]

    def cell(result, key=None):
        if not result:
            return "not measured"
        value = result["exact"] if key is None else result["fields"][key]
        return f"{value:.1%}"

    rows.append(f"| exact match | {cell(before)} | {cell(after)} |")
    rows += [f"| {key} | {cell(before, key)} | {cell(after, key)} |" for key in keys]
    n = (after or before)["n"]
    rows.append(f"\nScored on {n} held-out examples by greedy generation.")
    return rows


def _processes(summary: dict) -> str:
    """" x 2 processes (ddp)" for a run on several processes, else ""."""
    n = summary.get("processes") or 1
    return f" x {n} processes ({summary.get('strategy')})" if n > 1 else ""


def write_report(path: Path, *, config: dict, summary: dict, data: dict,
                 score_before: dict | None, score_after: dict | None) -> Path:
    """report.md: what was trained, on what, for how long, and how it scored before and after."""
    lines = [
        f"# LoRA run: {config['name']}",
        "",
        "## What was trained",
        f"- Base model: `{config['model']}`",
        f"- Adapter: r={summary['r']}, lora_alpha={summary['lora_alpha']}, dropout={summary['lora_dropout']}, "
        f"targets {', '.join(summary['target_modules'])}",
        f"- Variant: {summary.get('variant', 'LoRA')}"
        + (f"; adapter/: {summary['adapter_note']}" if summary.get("adapter_note") else ""),
        f"- Trainable parameters: {summary['trainable']:,} of {summary['total']:,} "
        f"({100 * summary['trainable'] / summary['total']:.4f}%)",
        f"- Precision: {summary['precision']}"
        + (f"; frozen base quantized to {summary['quantize']} (QLoRA: the adapter trained on the quantized "
           "weights; merge with `lorakit merge`, which merges into them dequantized)"
           if summary.get("quantize") else "; frozen base unquantized"),
        "",
        "## Data",
        f"- Training: {data['train']}",
        f"- Held-out: {data['val']}",
    ]
    for label, counts in (("training", data.get("train_skipped")), ("held-out", data.get("val_skipped"))):
        if counts:
            parts = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
            lines.append(f"- Left out of the {label} data: {parts}")
    if data.get("summary"):
        lines += ["", DATA_SUMMARY_TITLE, "", "```text", *data["summary"], "```"]
    lines += [
        "",
        "## Training",
        f"- Optimizer steps: {summary['steps']} (batch {config['batch_size']} x accumulation "
        f"{config['grad_accum']}{_processes(summary)}), epochs: {summary['epochs']:.2f}",
        f"- Learning rate: {config['learning_rate']:g}, warm-up then cosine decay",
        *_amount_rows(summary),
        f"- Training time: {summary['train_seconds']:.0f} s ({summary['tokens_per_second']:.0f} tokens/s)",
        f"- Final training loss: {_fmt(summary.get('final_loss'))}; held-out loss: "
        f"{_fmt(summary.get('heldout_before'))} before, {_fmt(summary.get('heldout_after'))} after",
        *_preference_rows(summary),
        "",
        "## Task score",
        *_score_rows(score_before, score_after, config.get("init_adapter")),
        "",
        "![loss](loss.png)",
        "",
    ]
    samples = (score_after or {}).get("samples") or []
    if samples:
        lines += ["## Sample answers (held-out)", ""]
        for s in samples:
            lines += [f"- prediction: `{s['prediction']}`", f"  reference:  `{s['reference']}`"]
        lines.append("")
    Path(path).write_text("\n".join(lines))
    return Path(path)


def read_data_summary(report: str) -> list[str]:
    """The data summary's lines that `write_report` kept in a report.md's text ([] when it has none)."""
    lines = report.splitlines()
    if DATA_SUMMARY_TITLE not in lines:
        return []
    start = lines.index(DATA_SUMMARY_TITLE) + 1
    while start < len(lines) and not lines[start].startswith("```"):
        start += 1
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("```")), len(lines))
    return lines[start + 1:end]


def _amount_rows(summary: dict) -> list[str]:
    if summary.get("preference"):
        return [f"- Preference pairs trained on: {summary['loss_tokens']:,}; tokens of their prompt + chosen and "
                f"prompt + rejected sequences: {summary['tokens']:,}"]
    return [f"- Answer tokens trained on: {summary['loss_tokens']:,}; tokens of the examples: {summary['tokens']:,}"]


def _preference_rows(summary: dict) -> list[str]:
    """A DPO / ORPO run's held-out rewards, before and after (`lorakit.train.preference`)."""
    before, after = summary.get("heldout_before_metrics") or {}, summary.get("heldout_after_metrics") or {}
    if "eval_reward_accuracy" not in (after or before):
        return []
    def pct(d, key):  # noqa: E306
        return f"{d[key]:.1%}" if key in d else "n/a"
    return ["", "## Preferences (held-out pairs)", "| | before | after |", "|---|---|---|",
            f"| reward accuracy (chosen rewarded above rejected) | {pct(before, 'eval_reward_accuracy')} | "
            f"{pct(after, 'eval_reward_accuracy')} |",
            *(f"| {label} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |" for key, label in (
                ("eval_reward_margin", "reward margin"), ("eval_rewards_chosen", "reward of chosen"),
                ("eval_rewards_rejected", "reward of rejected")))]


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
