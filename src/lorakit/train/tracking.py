"""Experiment trackers for `lorakit train --report-to`: TensorBoard, MLflow and trackio.

Every record the run writes to metrics.jsonl (`MetricsLog.write`) is forwarded to `Trackers.log`,
which logs its numbers at its step under tags named by its kind: ``train/loss``, ``train/lr``,
``eval/eval_loss``, ``score/exact_after`` (a score's phase is the suffix), plus
``train/tokens_per_second`` (tokens trained on / training seconds, so far). At the start each
tracker records the run's configuration; at the end report.md and loss.png, and how the run ended:
finished, failed or killed (interrupted).

Each backend stores its data under the run directory unless told otherwise: ``tensorboard/``
(event files), ``mlruns/`` (MLflow's file store; ``--tracking-uri`` names a server instead) and
``trackio/`` (trackio's SQLite store; ``$TRACKIO_DIR`` names another). ``--resume`` continues the
same tracker runs without logging a step twice: TensorBoard purges the steps after the checkpoint,
MLflow (its run id kept in ``tracking.json``) and trackio (the run of the same name) skip the
points each metric already has.

The backends, one class per library, are in `lorakit.train.tracking_backends`; the libraries are
optional (``pip install 'lorakit[tracking]'``) and imported inside them.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator, Protocol

from lorakit.errors import TrainingInterrupted
from lorakit.train.tracking_backends import (STATE_FILE, MLflowTracker, TensorBoardTracker, TrackioTracker,
                                             flat_params, import_tracker)

__all__ = ["TRACKERS", "Trackers", "Tracker", "open_trackers", "require", "report_targets", "report_to_problem",
           "tags_for", "flat_params", "STATE_FILE"]

TRACKERS = ("tensorboard", "mlflow", "trackio")
"""The names ``report_to`` accepts (``none``: no tracker)."""


def report_targets(value: Any) -> Any:
    """``report_to`` as a list of names: "tensorboard,mlflow" (the command line, $LORAKIT_REPORT_TO)
    or a list (config.yaml); "none" is no tracker. A value of another kind is returned as it is,
    for `report_to_problem` to name."""
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        return value
    names = [name.strip().lower() for name in value if name.strip()]
    return list(dict.fromkeys(name for name in names if name != "none"))


def report_to_problem(value: Any) -> str | None:
    """What is wrong with a ``report_to`` value (after `report_targets`), or None."""
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        return f"must be a list of tracker names: {', '.join(TRACKERS)} (on the command line: comma-separated)"
    unknown = [name for name in value if name not in TRACKERS]
    if unknown:
        return f"unknown tracker {', '.join(map(repr, unknown))}; the trackers are {', '.join(TRACKERS)}, or none"
    return None


def tags_for(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, by tag: ``{kind}/{key}``, a score's phase as a
    suffix (``score/exact_before``); a train record adds ``train/tokens_per_second``."""
    phase = values.get("phase")
    suffix = f"_{phase}" if isinstance(phase, str) else ""
    tags = {f"{kind}/{key}{suffix}": float(value) for key, value in values.items()
            if key not in ("kind", "step", "phase") and isinstance(value, (int, float)) and not isinstance(value, bool)}
    if kind == "train" and values.get("tokens") is not None and values.get("elapsed_s"):
        tags["train/tokens_per_second"] = values["tokens"] / values["elapsed_s"]
    return tags


class Tracker(Protocol):
    """One library's run (`lorakit.train.tracking_backends`)."""

    where: str
    """Where its data goes, for the line the run prints."""
    continued: bool
    """It continues a tracker run of an earlier session (--resume): the configuration is logged already."""

    def log(self, tags: dict[str, float], step: int) -> None: ...
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log_artifacts(self, paths: list[Path]) -> None: ...
    def truncate_after(self, step: int) -> None: ...
    def close(self, status: str, message: str) -> None: ...


class Trackers:
    """The run's trackers, one call for all of them; no trackers: every call does nothing."""

    def __init__(self, backends: list[Tracker] | None = None):
        self.backends = list(backends or [])
        self.closed = False

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        """One metrics.jsonl record (`MetricsLog.write`)."""
        tags = tags_for(kind, values)
        for backend in self.backends if tags else []:
            backend.log(tags, step)

    def log_config(self, config: dict[str, Any]) -> None:
        for backend in self.backends:
            if not backend.continued:
                backend.log_config(config)

    def log_artifacts(self, paths: list[Path]) -> None:
        """Files the run wrote (report.md, loss.png); those that do not exist are left out."""
        existing = [Path(p) for p in paths if Path(p).is_file()]
        for backend in self.backends:
            backend.log_artifacts(existing)

    def truncate_after(self, step: int) -> None:
        """On resume, from the checkpoint's step: the steps after it will be logged again."""
        for backend in self.backends:
            backend.truncate_after(step)

    def close(self, status: str = "finished", message: str = "") -> None:
        """End every tracker run as ``status`` (finished, failed or killed); once. Every backend is
        closed even when one fails; the first error is raised after."""
        if self.closed:
            return
        self.closed = True
        errors = []
        for backend in self.backends:
            try:
                backend.close(status, message)
            except Exception as err:  # noqa: BLE001 - the others are still closed
                errors.append(err)
        if errors:
            raise errors[0]

    def close_after(self, err: BaseException) -> None:
        """Close as killed after an interruption, as failed after an error, so that no tracker run
        is left "running". A tracker that cannot close then is said, not raised: the error that
        stopped the run is the one that matters."""
        killed = isinstance(err, (TrainingInterrupted, KeyboardInterrupt))
        try:
            self.close("killed" if killed else "failed", f"{type(err).__name__}: {err}".split("\n")[0])
        except Exception as close_error:  # noqa: BLE001
            print(f"tracking: could not close the tracker runs: {close_error}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def closed_on_exit(self) -> Iterator["Trackers"]:
        """Around a run: closed as finished, or after the error or signal that stopped it."""
        try:
            yield self
        except BaseException as err:
            self.close_after(err)
            raise
        self.close("finished")


def require(names: list[str]) -> None:
    """A ConfigError naming the tracker and the install command when a library is missing: checked
    before the model is loaded, so that a missing package costs no time."""
    for name in names:
        import_tracker(name)


def open_trackers(names: list[str], run_dir: Path, *, config: dict[str, Any], resume: bool,
                  tracking_uri: str | None = None) -> Trackers:
    """The trackers ``names`` for the run in ``run_dir``, each continuing its earlier run when
    ``resume``; the configuration logged by those that start a new one."""
    run_dir = Path(run_dir)
    makers = {"tensorboard": lambda: TensorBoardTracker(run_dir / "tensorboard", resume),
              "mlflow": lambda: MLflowTracker(run_dir, tracking_uri, resume),
              "trackio": lambda: TrackioTracker(run_dir, resume)}
    trackers = Trackers()
    try:
        for name in names:
            trackers.backends.append(makers[name]())
        trackers.log_config(config)
    except BaseException as err:  # e.g. an MLflow server that does not answer: those opened are closed
        trackers.close_after(err)
        raise
    if trackers.backends:
        print(f"tracking: {'; '.join(b.where for b in trackers.backends)}", flush=True)
    return trackers
