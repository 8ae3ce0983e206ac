"""`diagnose`: read a finished run's loss curves and say what went wrong, with evidence and fixes.

The verdicts follow the LoRA lesson's troubleshooting, checked in this order:

- diverging: a NaN/Inf loss or gradient norm; a spike, a loss over SPIKE_FACTOR (2.5) times the
  median of the steps before it *and* higher than that median by SPIKE_SCALE (25%) of the run's
  starting loss (a ratio alone is noise once a loss has converged near zero: 0.006 is 4x 0.0014);
  or a loss that ends 10% above where it started -> lower the learning rate.
- not learning: held-out loss fell less than 5% from the evaluation before training to the last
  (without one: training loss, from the first tenth of the steps to the last)
  -> raise the learning rate, check the labels.
- overfitting: held-out loss rose 5% above its best, taken as the mean of the (up to) last three
  evaluations after the best one, while training loss kept falling -> stop at the best step,
  more data. (Held-out losses on a few examples are noisy: one low or high point at the end
  neither makes nor hides the pattern.)
- underfitting: training loss levelled off (changed less than 2% over the last quarter) above
  --high-loss (1.0), held-out loss likewise. The curves show a plateau, not its cause, so the
  advice is an experiment: rerun with twice the rank and the MLP projections and compare.
- healthy: none of the above.
- inconclusive: fewer than 8 training points.

Each verdict carries a confidence (high, medium or low) and the numbers it rests on: how far the
deciding quantity is past its threshold, and how many points it was measured on. The rules are
checked on real runs of the default model kept in tests/plan/fixtures/real_runs/ (its README lists
each run, the command that made it and its verdict; a rerun with the advised change shows that
the change helps).

(The thresholds are the constants below: SPIKE_FACTOR, SPIKE_SCALE, FLAT_DROP, RISE, TAIL_EVALS,
PLATEAU_CHANGE, HIGH_LOSS, MIN_POINTS.)"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.plan.metrics import Metrics, TrainPoint, read_metrics

__all__ = ["Diagnosis", "diagnose", "diagnose_metrics", "VERDICTS"]

VERDICTS = ("diverging", "not_learning", "overfitting", "underfitting", "healthy", "inconclusive")
CONFIDENCES = ("high", "medium", "low")
MIN_POINTS = 8
SPIKE_FACTOR = 2.5
SPIKE_SCALE = 0.25  # a spike must also rise this fraction of the starting loss above the median
FLAT_DROP = 0.05
RISE = 0.05
TAIL_EVALS = 3  # the held-out rise is the mean of up to this many last evaluations
PLATEAU_CHANGE = 0.02
HIGH_LOSS = 1.0  # nats per token: fine-tuning targets (formats, answers) usually end well below
USUAL_LR = 2e-4  # LoRA's usual learning rate (and lorakit's default)
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Diagnosis:
    """A verdict on a run, how sure it is and why, the numbers behind it, and what to change."""

    verdict: str  # one of VERDICTS
    summary: str
    evidence: tuple[str, ...]
    changes: tuple[str, ...]
    marker_step: int | None  # the step the plot marks (first NaN, best held-out loss, ...)
    stats: dict[str, Any]
    metrics: Metrics = field(repr=False, compare=False)
    confidence: str = "medium"  # one of CONFIDENCES
    confidence_reason: str = ""  # the margin and the number of points the verdict rests on

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "confidence": self.confidence,
                "confidence_reason": self.confidence_reason, "summary": self.summary,
                "evidence": list(self.evidence), "changes": list(self.changes),
                "marker_step": self.marker_step, "stats": self.stats,
                "metrics": self.metrics.path}


def diagnose(run: str | os.PathLike, *, high_loss: float = HIGH_LOSS) -> Diagnosis:
    """Diagnose a run directory (its metrics.jsonl, and adapter/adapter_config.json and
    config.yaml if there)."""
    run = Path(run)
    metrics = read_metrics(run)
    settings = _run_settings(Path(metrics.path).parent)
    return diagnose_metrics(metrics, settings=settings, high_loss=high_loss)


def diagnose_metrics(metrics: Metrics, settings: dict[str, Any] | None = None, *,
                     high_loss: float = HIGH_LOSS) -> Diagnosis:
    """The verdict for ``metrics``; ``settings`` (r, lora_dropout, target_modules from the
    adapter config; learning_rate, warmup_ratio, max_grad_norm from config.yaml) make the
    suggested changes concrete."""
    settings = settings or {}
    train = metrics.train
    finite = [p for p in train if math.isfinite(p.loss)]
    stats = _stats(metrics, finite)

    def verdict(kind, summary, evidence, changes, marker, confidence, reason):
        return Diagnosis(kind, summary, tuple(evidence), tuple(changes), marker, stats, metrics,
                         confidence, reason)

    if len(finite) < MIN_POINTS and len(finite) == len(train):
        return verdict("inconclusive", f"only {len(train)} training points: too few to judge",
                       [f"{len(train)} training lines in {metrics.path}"],
                       ["log more often (every few steps) or train longer, then diagnose again"],
                       None, "low", f"{len(train)} training points, fewer than {MIN_POINTS}")
    lr = _lr_text(stats)
    diverging = _divergence(train, finite, stats)
    if diverging:
        evidence, marker, confidence, reason = diverging
        return verdict("diverging", "training diverged: the loss blew up", evidence,
                       _divergence_changes(stats, settings), marker, confidence, reason)

    w = max(3, len(finite) // 10)
    start, end = _mean(finite[:w]), _mean(finite[-w:])
    drop = (start - end) / start if start > 0 else 0.0
    span = f"steps {finite[0].step}-{finite[-1].step}"
    evals = [e for e in metrics.evals if math.isfinite(e.eval_loss)]
    # Held-out loss is measured on the same examples each time, so it moves far less from noise
    # than a few batches' training loss (+-5% a step on task-api): it decides when it exists.
    # It decides only when it was measured before training began (the trainer's step-0 eval).
    held = (evals[0].eval_loss, evals[-1].eval_loss) if evals else (0.0, 0.0)
    held_drop = ((held[0] - held[1]) / held[0] if len(evals) >= 2 and held[0] > 0
                 and evals[0].step <= finite[0].step else None)
    deciding = drop if held_drop is None else held_drop
    if deciding < FLAT_DROP:
        max_lr = stats["max_lr"]
        return verdict("not_learning", "the loss barely moved", [
            f"training loss {start:.3f} -> {end:.3f} ({-drop:+.1%}) over {span}",
            *([f"held-out loss {held[0]:.3f} at step {evals[0].step} -> {held[1]:.3f} at step "
               f"{evals[-1].step} ({-held_drop:+.1%})"] if held_drop is not None else []),
            *([f"the learning rate peaked at {max_lr:.0e}"] if max_lr else []),
        ], [
            f"raise the learning rate{lr} to {USUAL_LR:g} (LoRA's usual rate)"
            if not max_lr or max_lr < USUAL_LR else
            f"the learning rate{lr} is already LoRA's usual: test a larger adapter, rerun the "
            f"same steps with {_larger_adapter(settings)}",
            "check the labels: the assistant tokens must be labelled (not all -100), and a "
            "loss that starts near 0 means the model already knows the answers",
        ], None, "high" if deciding < FLAT_DROP / 2 and len(finite) >= 20 else "medium",
            f"the {'training' if held_drop is None else 'held-out'} loss fell {deciding:.1%} "
            f"(a run that learns falls at least {FLAT_DROP:.0%}), "
            + (f"means of the first and last {w} of {len(finite)} points" if held_drop is None
               else f"first and last of {len(evals)} evaluations"))

    overfit = _overfitting(finite, evals, w)
    if overfit:
        best, tail, train_at_best = overfit
        last, tail_mean = tail[-1], sum(e.eval_loss for e in tail) / len(tail)
        epoch = _epoch_at(train, best.step)
        rise = tail_mean / best.eval_loss - 1
        return verdict("overfitting", "held-out loss rose while training loss kept falling", [
            f"held-out loss was lowest, {best.eval_loss:.3f}, at step {best.step}"
            + (f" (epoch {epoch:.2f})" if epoch is not None else "")
            + f", then rose to {last.eval_loss:.3f} at step {last.step} "
              f"({last.eval_loss / best.eval_loss - 1:+.1%})"
            + (f"; {tail_mean:.3f} on average over the last {len(tail)} evaluations "
               f"({rise:+.1%})" if len(tail) > 1 else ""),
            f"training loss kept falling meanwhile: {train_at_best:.3f} -> {end:.3f}",
        ], _overfitting_changes(best, epoch), best.step,
            "high" if rise >= 2 * RISE and len(tail) > 1 else "medium",
            f"held-out loss {rise:+.1%} above its best (the threshold is {RISE:+.0%}), "
            f"mean of {len(tail)} evaluation(s) after the best of {len(evals)}")

    q = max(3, len(finite) // 4)
    before, last_quarter = _mean(finite[-2 * q:-q]), _mean(finite[-q:])
    change = (before - last_quarter) / before if before > 0 else 0.0
    last_eval = evals[-1].eval_loss if evals else None
    if change < PLATEAU_CHANGE and end > high_loss and (last_eval is None or last_eval > high_loss):
        return verdict("underfitting", "both losses levelled off high", [
            f"training loss levelled off at {last_quarter:.3f} (changed {-change:+.1%} over the "
            f"last quarter, steps {finite[-q].step}-{finite[-1].step}), above {high_loss:g}",
            f"held-out loss {last_eval:.3f} at step {evals[-1].step}" if evals
            else "no held-out evaluations in the log",
            "a plateau shows that this configuration stopped improving, not why: the adapter's "
            "capacity, the learning rate, a task the model cannot learn from its inputs, or the "
            "data's own unpredictability (free text rarely ends far below 1.5 nats per token)",
        ], _underfitting_changes(settings), finite[-q].step,
            "medium" if change < PLATEAU_CHANGE / 2 and len(finite) >= 20 else "low",
            f"the loss changed {-change:+.1%} over the last quarter (a plateau: under "
            f"{PLATEAU_CHANGE:.0%}), {q} points; the cause is not in the curves")

    evidence = [f"training loss fell {start:.3f} -> {end:.3f} ({-drop:+.1%}) over {span}"]
    if evals:
        best = min(evals, key=lambda e: e.eval_loss)
        evidence.append(f"held-out loss {evals[-1].eval_loss:.3f} at step {evals[-1].step} "
                        f"(best {best.eval_loss:.3f} at step {best.step})")
    else:
        evidence.append("no held-out evaluations in the log: overfitting cannot be ruled out")
    evidence.append("no NaN, no loss spikes")
    confidence = "high" if len(evals) >= 3 and drop >= 4 * FLAT_DROP else "medium" if evals else "low"
    return verdict("healthy", "the run learned and did not overfit", evidence,
                   ["none needed; to go further, score the adapter on held-out examples"],
                   evals[-1].step if evals else None, confidence,
                   f"the loss fell {drop:.1%} over {len(finite)} points; "
                   + (f"{len(evals)} held-out evaluations, none showing a rise"
                      if evals else "no held-out evaluations"))


def _divergence_changes(stats: dict, settings: dict) -> list[str]:
    """Lower the learning rate (tests/plan/fixtures/real_runs: diverging at 2e-2 -> healthy at 2e-3);
    warm-up and clipping only where the run's config.yaml shows them off."""
    peak = stats["max_lr"]
    changes = [f"lower the learning rate (peak {peak:.0e}) by 10x, to {peak / 10:.0e}" if peak
               else "lower the learning rate by 10x"]
    warmup, clip = settings.get("warmup_ratio"), settings.get("max_grad_norm")
    if warmup == 0:
        changes.append("add a warm-up (warmup_ratio 0.05)")
    if clip == 0:
        changes.append("clip gradients (max_grad_norm 1.0)")
    if warmup is None or clip is None:
        changes.append("check that warm-up and gradient clipping are on (lorakit's defaults: "
                       "warmup_ratio 0.05, max_grad_norm 1.0)")
    return changes


def _overfitting_changes(best, epoch) -> list[str]:
    """Stop at the best step (the run's own held-out curve shows it) and more data (the
    24-examples fixture, 3x the data, does not overfit). Lower rank and more dropout are not
    advised: no real run in the fixtures shows them helping."""
    return [
        f"stop at step {best.step}" + (f" (epoch {epoch:.2f}): train fewer epochs"
                                       if epoch is not None else ": train fewer steps"),
        "add more (and more varied) training examples",
    ]


def _larger_adapter(settings: dict) -> str:
    """Twice the rank, and the MLP projections where the adapter leaves them out."""
    r, targets = settings.get("r"), settings.get("target_modules") or []
    missing = [t for t in MLP_TARGETS if t not in targets] if isinstance(targets, list) else []
    return (f"r={r} -> {2 * r}" if r else "twice the rank") + (
        f" and the MLP projections ({', '.join(missing)}) added to target_modules" if missing else "")


def _underfitting_changes(settings: dict) -> list[str]:
    return [
        f"test whether capacity is the limit: rerun the same steps with {_larger_adapter(settings)} "
        "and compare the held-out loss; if it does not fall clearly lower, capacity is not the limit",
        "if capacity is not the limit: train longer or at a higher learning rate, and check that "
        "the answer can be learned from the inputs",
    ]


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


def _divergence(train, finite, stats):
    """(evidence, marker step, confidence, its reason) when the run diverged, else None."""
    bad = stats["non_finite_steps"]
    if bad:
        what = "loss" if any(not math.isfinite(p.loss) for p in train if p.step == bad[0]) else "gradient norm"
        return [f"the {what} is NaN or Inf at step {bad[0]}" + (
            f" ({len(bad)} of {len(train)} logged steps)" if len(bad) > 1 else "")], bad[0], "high", \
            "a non-finite value cannot come from a healthy run"
    w = max(3, len(finite) // 10)
    start, end = _mean(finite[:w]), _mean(finite[-w:])
    window = max(5, len(finite) // 20)
    for i in range(window, len(finite)):
        median = statistics.median(p.loss for p in finite[i - window:i])
        rise = finite[i].loss - median
        if median > 0 and finite[i].loss > SPIKE_FACTOR * median and rise > SPIKE_SCALE * start:
            return [f"the loss spiked to {finite[i].loss:.3f} at step {finite[i].step}, "
                    f"{finite[i].loss / median:.1f}x the median of the {window} steps before, "
                    f"{rise:.3f} above it ({rise / start:.0%} of the starting loss {start:.3f})"], \
                finite[i].step, "high" if rise >= start else "medium", \
                f"a rise of {rise / start:.0%} of the starting loss (a spike: over " \
                f"{SPIKE_SCALE:.0%} and {SPIKE_FACTOR:g}x the median)"
    if end > 1.1 * start:
        low = min(finite, key=lambda p: p.loss)
        return [f"the loss ended higher than it started: {start:.3f} -> {end:.3f} "
                f"(lowest {low.loss:.3f} at step {low.step})"], low.step, \
            "high" if end > 1.5 * start else "medium", \
            f"the loss ended {end / start - 1:+.0%} against its start (the threshold is +10%), " \
            f"means of the first and last {w} points"
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
    """r, lora_dropout and target_modules from the run's adapter config, and learning_rate,
    warmup_ratio and max_grad_norm from its config.yaml, where the run has them."""
    settings: dict[str, Any] = {}
    for path in (run / "adapter" / "adapter_config.json", run / "adapter_config.json"):
        if path.is_file():
            try:
                config = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as err:
                raise AdapterFormatError(f"{path}: not valid JSON ({err}); fix or remove it to "
                                         "diagnose the run from its metrics alone") from err
            settings = {k: config.get(k) for k in ("r", "lora_dropout", "target_modules")
                        if isinstance(config, dict) and config.get(k) is not None}
            break
    path = run / "config.yaml"
    if path.is_file():
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: not valid YAML ({err}); fix or remove it to diagnose "
                              "the run from its metrics alone") from err
        if isinstance(config, dict):
            settings |= {k: config[k] for k in ("learning_rate", "warmup_ratio", "max_grad_norm")
                         if isinstance(config.get(k), (int, float))}
    return settings
