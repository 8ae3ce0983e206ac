"""`diagnose`: read a finished run's loss curves and say what went wrong, with evidence and fixes.

The verdicts follow the LoRA lesson's troubleshooting, checked in this order:

- diverging: a NaN/Inf loss or gradient norm, a spike (a loss over 2.5x the median of the steps
  before it), or a loss that ends 10% above where it started
  -> lower the learning rate, add warm-up, clip gradients.
- not learning: training loss fell less than 5% from the first tenth of the steps to the last
  -> raise the learning rate or the rank, check the labels.
- overfitting: held-out loss rose 5% above its best, taken as the mean of the (up to) last three
  evaluations after the best one, while training loss kept falling -> lower rank, more dropout,
  fewer epochs (stop at the best step), more data. (Held-out losses on a few examples are noisy:
  one low or high point at the end neither makes nor hides the pattern.)
- underfitting: training loss levelled off (changed less than 2% over the last quarter) above
  --high-loss (1.0), held-out loss likewise -> raise rank, add MLP targets.
- healthy: none of the above. With fewer than 8 training points: inconclusive.

(The thresholds are the constants below: SPIKE_FACTOR, FLAT_DROP, RISE, TAIL_EVALS,
PLATEAU_CHANGE, HIGH_LOSS, MIN_POINTS.)"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFormatError
from lorakit.plan.metrics import Metrics, TrainPoint, read_metrics

__all__ = ["Diagnosis", "diagnose", "diagnose_metrics", "VERDICTS"]

VERDICTS = ("diverging", "not_learning", "overfitting", "underfitting", "healthy", "inconclusive")
MIN_POINTS = 8
SPIKE_FACTOR = 2.5
FLAT_DROP = 0.05
RISE = 0.05
TAIL_EVALS = 3  # the held-out rise is the mean of up to this many last evaluations
PLATEAU_CHANGE = 0.02
HIGH_LOSS = 1.0  # nats per token: fine-tuning targets (formats, answers) usually end well below
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Diagnosis:
    """A verdict on a run, the numbers behind it, and what to change."""

    verdict: str  # one of VERDICTS
    summary: str
    evidence: tuple[str, ...]
    changes: tuple[str, ...]
    marker_step: int | None  # the step the plot marks (first NaN, best held-out loss, ...)
    stats: dict[str, Any]
    metrics: Metrics = field(repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "summary": self.summary,
                "evidence": list(self.evidence), "changes": list(self.changes),
                "marker_step": self.marker_step, "stats": self.stats,
                "metrics": self.metrics.path}


def diagnose(run: str | os.PathLike, *, high_loss: float = HIGH_LOSS) -> Diagnosis:
    """Diagnose a run directory (its metrics.jsonl, and adapter/adapter_config.json if there)."""
    run = Path(run)
    metrics = read_metrics(run)
    settings = _run_settings(Path(metrics.path).parent)
    return diagnose_metrics(metrics, settings=settings, high_loss=high_loss)


def diagnose_metrics(metrics: Metrics, settings: dict[str, Any] | None = None, *,
                     high_loss: float = HIGH_LOSS) -> Diagnosis:
    """The verdict for ``metrics``; ``settings`` (r, lora_dropout, target_modules) make the
    suggested changes concrete."""
    settings = settings or {}
    train = metrics.train
    finite = [p for p in train if math.isfinite(p.loss)]
    stats = _stats(metrics, finite)

    def verdict(kind, summary, evidence, changes, marker=None):
        return Diagnosis(kind, summary, tuple(evidence), tuple(changes), marker, stats, metrics)

    if len(finite) < MIN_POINTS and len(finite) == len(train):
        return verdict("inconclusive", f"only {len(train)} training points: too few to judge",
                       [f"{len(train)} training lines in {metrics.path}"],
                       ["log more often (every few steps) or train longer, then diagnose again"])
    lr = _lr_text(stats)
    diverging = _divergence(train, finite, stats)
    if diverging:
        evidence, marker = diverging
        return verdict("diverging", "training diverged: the loss blew up", evidence, [
            f"lower the learning rate{lr} by 2-10x",
            "add a warm-up (e.g. the first 3-10% of steps)",
            "clip gradients (max_grad_norm 1.0)",
        ], marker)

    w = max(3, len(finite) // 10)
    start, end = _mean(finite[:w]), _mean(finite[-w:])
    drop = (start - end) / start if start > 0 else 0.0
    span = f"steps {finite[0].step}-{finite[-1].step}"
    if drop < FLAT_DROP:
        r = settings.get("r")
        return verdict("not_learning", "the training loss barely moved", [
            f"training loss {start:.3f} -> {end:.3f} ({-drop:+.1%}) over {span}",
            *([f"the learning rate peaked at {stats['max_lr']:.0e}"] if stats["max_lr"] else []),
        ], [
            f"raise the learning rate{lr} towards 2e-4 (LoRA's usual rate)"
            if not stats["max_lr"] or stats["max_lr"] < 2e-4 else
            f"the learning rate{lr} is already LoRA's usual; raise the rank instead",
            f"raise the rank (r={r} -> {2 * r})" if r else "raise the rank (e.g. 8 -> 16)",
            "check the labels: the assistant tokens must be labelled (not all -100), and a "
            "loss that starts near 0 means the model already knows the answers",
        ])

    evals = [e for e in metrics.evals if math.isfinite(e.eval_loss)]
    overfit = _overfitting(finite, evals, w)
    if overfit:
        best, tail, train_at_best = overfit
        last, tail_mean = tail[-1], sum(e.eval_loss for e in tail) / len(tail)
        r, dropout = settings.get("r"), settings.get("lora_dropout")
        epoch = _epoch_at(train, best.step)
        return verdict("overfitting", "held-out loss rose while training loss kept falling", [
            f"held-out loss was lowest, {best.eval_loss:.3f}, at step {best.step}"
            + (f" (epoch {epoch:.2f})" if epoch is not None else "")
            + f", then rose to {last.eval_loss:.3f} at step {last.step} "
              f"({last.eval_loss / best.eval_loss - 1:+.1%})"
            + (f"; {tail_mean:.3f} on average over the last {len(tail)} evaluations "
               f"({tail_mean / best.eval_loss - 1:+.1%})" if len(tail) > 1 else ""),
            f"training loss kept falling meanwhile: {train_at_best:.3f} -> {end:.3f}",
        ], [
            f"stop at step {best.step}" + (f" (epoch {epoch:.2f}): train fewer epochs"
                                           if epoch is not None else ": train fewer steps"),
            f"lower the rank (r={r} -> {max(1, r // 2)})" if r else "lower the rank (e.g. 16 -> 8)",
            f"add dropout (lora_dropout={dropout:g} -> {max(0.1, dropout * 2):g})"
            if dropout is not None else "add dropout (lora_dropout 0.05-0.1)",
            "add more (and more varied) training examples",
        ], best.step)

    q = max(3, len(finite) // 4)
    before, last_quarter = _mean(finite[-2 * q:-q]), _mean(finite[-q:])
    change = (before - last_quarter) / before if before > 0 else 0.0
    last_eval = evals[-1].eval_loss if evals else None
    if change < PLATEAU_CHANGE and end > high_loss and (last_eval is None or last_eval > high_loss):
        r, targets = settings.get("r"), settings.get("target_modules") or []
        missing_mlp = [t for t in MLP_TARGETS if t not in targets] if targets else list(MLP_TARGETS)
        return verdict("underfitting", "both losses levelled off high: the adapter lacks capacity", [
            f"training loss levelled off at {last_quarter:.3f} (changed {-change:+.1%} over the "
            f"last quarter, steps {finite[-q].step}-{finite[-1].step}), above {high_loss:g}",
            f"held-out loss {last_eval:.3f} at step {evals[-1].step}" if evals
            else "no held-out evaluations in the log",
        ], [
            f"raise the rank (r={r} -> {2 * r})" if r else "raise the rank (e.g. 16 -> 32)",
            f"add the MLP projections to target_modules ({', '.join(missing_mlp)})"
            if missing_mlp else "the MLP is already targeted: consider a larger base model",
            "check that the task is learnable from the inputs (is the answer in the prompt?)",
        ], finite[-q].step)

    evidence = [f"training loss fell {start:.3f} -> {end:.3f} ({-drop:+.1%}) over {span}"]
    if evals:
        best = min(evals, key=lambda e: e.eval_loss)
        evidence.append(f"held-out loss {evals[-1].eval_loss:.3f} at step {evals[-1].step} "
                        f"(best {best.eval_loss:.3f} at step {best.step})")
    else:
        evidence.append("no held-out evaluations in the log: overfitting cannot be ruled out")
    evidence.append("no NaN, no loss spikes")
    return verdict("healthy", "the run learned and did not overfit", evidence,
                   ["none needed; to go further, score the adapter on held-out examples"],
                   evals[-1].step if evals else None)


def _mean(points: list[TrainPoint]) -> float:
    return sum(p.loss for p in points) / len(points)


def _stats(metrics: Metrics, finite: list[TrainPoint]) -> dict[str, Any]:
    lrs = [p.lr for p in metrics.train if p.lr is not None and math.isfinite(p.lr)]
    evals = [e for e in metrics.evals if math.isfinite(e.eval_loss)]
    best = min(evals, key=lambda e: e.eval_loss) if evals else None
    return {
        "train_points": len(metrics.train), "eval_points": len(metrics.evals),
        "first_step": metrics.train[0].step if metrics.train else None,
        "last_step": metrics.train[-1].step if metrics.train else None,
        "start_loss": finite[0].loss if finite else None,
        "end_loss": finite[-1].loss if finite else None,
        "min_loss": min(p.loss for p in finite) if finite else None,
        "max_lr": max(lrs) if lrs else None,
        "best_eval_loss": best.eval_loss if best else None,
        "best_eval_step": best.step if best else None,
        "last_eval_loss": evals[-1].eval_loss if evals else None,
        "non_finite_steps": [p.step for p in metrics.train if not math.isfinite(p.loss)
                             or (p.grad_norm is not None and not math.isfinite(p.grad_norm))],
    }


def _lr_text(stats: dict) -> str:
    return f" (peak {stats['max_lr']:.0e})" if stats["max_lr"] else ""


def _divergence(train, finite, stats) -> tuple[list[str], int] | None:
    bad = stats["non_finite_steps"]
    if bad:
        what = "loss" if any(not math.isfinite(p.loss) for p in train if p.step == bad[0]) else "gradient norm"
        return [f"the {what} is NaN or Inf at step {bad[0]}" + (
            f" ({len(bad)} of {len(train)} logged steps)" if len(bad) > 1 else "")], bad[0]
    w = max(5, len(finite) // 20)
    for i in range(w, len(finite)):
        median = statistics.median(p.loss for p in finite[i - w:i])
        if median > 0 and finite[i].loss > SPIKE_FACTOR * median:
            return [f"the loss spiked to {finite[i].loss:.3f} at step {finite[i].step}, "
                    f"{finite[i].loss / median:.1f}x the median of the {w} steps before"], finite[i].step
    w = max(3, len(finite) // 10)
    start, end = _mean(finite[:w]), _mean(finite[-w:])
    if end > 1.1 * start:
        low = min(finite, key=lambda p: p.loss)
        return [f"the loss ended higher than it started: {start:.3f} -> {end:.3f} "
                f"(lowest {low.loss:.3f} at step {low.step})"], low.step
    return None


def _overfitting(finite, evals, w):
    """(best evaluation, the evaluations the rise is measured on, training loss near the best)
    when held-out loss rose RISE above its best while training loss kept falling, else None."""
    if len(evals) < 3:
        return None
    best_i = min(range(len(evals)), key=lambda i: evals[i].eval_loss)
    best, after = evals[best_i], evals[best_i + 1:]
    tail = after[-TAIL_EVALS:]
    if not tail or sum(e.eval_loss for e in tail) / len(tail) < (1 + RISE) * best.eval_loss:
        return None
    near = sorted(finite, key=lambda p: abs(p.step - best.step))[:w]
    train_at_best = _mean(near)
    later = [p for p in finite if p.step > best.step]
    if len(later) < 2 or _mean(later[-w:]) >= train_at_best:
        return None  # training loss did not keep falling: not the overfitting pattern
    return best, tail, train_at_best


def _epoch_at(train, step: int) -> float | None:
    epochs = [p.epoch for p in train if p.step <= step and p.epoch is not None
              and math.isfinite(p.epoch)]
    return epochs[-1] if epochs else None


def _run_settings(run: Path) -> dict[str, Any]:
    """r, lora_dropout and target_modules from the run's adapter config, if it has one."""
    for path in (run / "adapter" / "adapter_config.json", run / "adapter_config.json"):
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise AdapterFormatError(f"{path}: not valid JSON ({err}); fix or remove it to "
                                         "diagnose the run from its metrics alone") from err
            return {k: config.get(k) for k in ("r", "lora_dropout", "target_modules")
                    if isinstance(config, dict) and config.get(k) is not None}
    return {}
