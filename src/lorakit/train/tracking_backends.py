"""The experiment trackers' backends, one class per library (the interface: `lorakit.train.tracking`).

Each takes the tags and steps of `Trackers.log` and stores them in its library's own format, under
the run directory unless told otherwise. The libraries are optional: each is imported inside its
backend (``pip install 'lorakit[tracking]'``), and a missing one is a ConfigError naming it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from lorakit.errors import ConfigError

__all__ = ["TensorBoardTracker", "MLflowTracker", "TrackioTracker", "import_tracker", "flat_params",
           "STATE_FILE", "PROJECT", "INSTALL"]

INSTALL = "pip install 'lorakit[tracking]'"
STATE_FILE = "tracking.json"
"""In the run directory: the MLflow run a resumed run continues."""
PROJECT = "lorakit"
"""MLflow's experiment (unless $MLFLOW_EXPERIMENT_NAME) and trackio's project; the run directory's
name is the run's name."""
# MLflow's limits on a param (mlflow.utils.validation): longer values are cut, with a mark
MLFLOW_PARAM_LENGTH, MLFLOW_KEY_LENGTH, MLFLOW_PARAMS_PER_BATCH = 6000, 250, 100


def import_tracker(name: str) -> Any:
    """The tracker library ``name`` (its import name is its tracker name), or a ConfigError that
    says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ConfigError(f"report_to={name}: the {name} package is not installed; install the trackers "
                          f"with: {INSTALL}") from None


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The configuration as one level of parameters: a nested mapping's keys joined with ".",
    (``lora.r``); numbers and strings kept, anything else (lists, None) as its text."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{prefix}{key}."))
        else:
            keep = isinstance(value, (int, float, str)) and not isinstance(value, bool)
            flat[f"{prefix}{key}"] = value if keep else str(value)
    return flat


class TensorBoardTracker:
    """Event files in ``directory``: scalars by step, the configuration as hyper-parameters (the
    HPARAMS tab), report.md as text and loss.png as an image. On resume the writer purges the
    steps after the checkpoint (``purge_step``), so those logged again replace them; a run started
    again from its first step in the same directory purges them all."""

    def __init__(self, directory: Path, resume: bool):
        import_tracker("tensorboard")
        self.directory = directory
        self.where = f"tensorboard --logdir {directory}"
        earlier = any(directory.glob("events.out.tfevents.*"))
        self.continued = resume and earlier
        self._purge_step: int | None = 0 if earlier and not resume else None
        self._writer_: Any = None
        self._step = 0

    def _writer(self) -> Any:
        """Made at the first write, after a resume has set the step to purge from."""
        if self._writer_ is None:
            from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard

            self._writer_ = SummaryWriter(log_dir=str(self.directory), purge_step=self._purge_step)
        return self._writer_

    def log(self, tags: dict[str, float], step: int) -> None:
        for tag, value in tags.items():
            self._writer().add_scalar(tag, value, step)
        self._step = max(self._step, step)

    def log_config(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams  # optional: tensorboard

        for summary in hparams(flat_params(config), {}):
            self._writer().file_writer.add_summary(summary)

    def log_artifacts(self, paths: list[Path]) -> None:
        from PIL import Image  # matplotlib's dependency, imported by it lazily too

        for path in paths:
            if path.suffix == ".png":
                with Image.open(path) as image:
                    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3)
                self._writer().add_image(path.name, pixels, self._step, dataformats="HWC")
            else:
                self._writer().add_text(path.name, path.read_text(encoding="utf-8"), self._step)

    def truncate_after(self, step: int) -> None:
        self._purge_step = step + 1

    def close(self, status: str, message: str) -> None:
        if status != "finished":
            self._writer().add_text("status", f"{status}: {message}", self._step)
        if self._writer_ is not None:
            self._writer_.close()


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses its file store unless $MLFLOW_ALLOW_FILE_STORE is true (it wants a
    database, which needs SQLAlchemy, not in mlflow-skinny); allowed while lorakit uses it,
    without changing the environment for the rest of the process."""
    before = os.environ.get("MLFLOW_ALLOW_FILE_STORE")
    if uri.startswith("file:"):
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)
        else:
            os.environ["MLFLOW_ALLOW_FILE_STORE"] = before


def _in_store(method: Callable) -> Callable:
    """An `MLflowTracker` method that reaches its store (which MLflow may make again at any call)."""
    @functools.wraps(method)
    def reaching(self: "MLflowTracker", *args: Any) -> Any:
        with _file_store_allowed(self.uri):
            return method(self, *args)
    return reaching


class MLflowTracker:
    """An MLflow run: metrics by step, the flattened configuration as params (values cut to
    MLflow's limit), report.md and loss.png as artifacts, and its end status (FINISHED, FAILED,
    KILLED). The store: ``tracking_uri``, else $MLFLOW_TRACKING_URI, else ``run_dir/mlruns``."""

    def __init__(self, run_dir: Path, tracking_uri: str | None, resume: bool):
        import_tracker("mlflow")
        from mlflow.tracking import MlflowClient  # optional: mlflow

        self.uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").resolve().as_uri()
        with _file_store_allowed(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
            self._start(run_dir, resume)
        self.where = f"mlflow run {self.run_id} in {self.uri}"

    def _start(self, run_dir: Path, resume: bool) -> None:
        """Continue the run tracking.json names (--resume, same store), else start one and name it there."""
        state_path = run_dir / STATE_FILE
        saved = json.loads(state_path.read_text()).get("mlflow", {}) if resume and state_path.is_file() else {}
        self.continued = saved.get("tracking_uri") == self.uri
        self._last: dict[str, int] = {}
        if self.continued:
            self.run_id = saved["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            for key in self.client.get_run(self.run_id).data.metrics:  # the points already there
                self._last[key] = max(m.step for m in self.client.get_metric_history(self.run_id, key))
        else:
            experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or PROJECT
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
            _write_json(state_path, {"mlflow": {"tracking_uri": self.uri, "experiment_id": experiment_id,
                                                "run_id": self.run_id}})

    @_in_store
    def log(self, tags: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # optional: mlflow

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, step) for key, value in tags.items() if step > self._last.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    @_in_store
    def log_config(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param  # optional: mlflow

        params = [Param(_mlflow_key(key), _cut(str(value))) for key, value in flat_params(config).items()]
        for start in range(0, len(params), MLFLOW_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=params[start:start + MLFLOW_PARAMS_PER_BATCH])

    @_in_store
    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self.client.log_artifact(self.run_id, str(path))

    def truncate_after(self, step: int) -> None:
        """Nothing to do: MLflow keeps every point; those a metric has already are skipped (`log`)."""

    @_in_store
    def close(self, status: str, message: str) -> None:
        if message:
            self.client.set_tag(self.run_id, "lorakit.ended", _cut(f"{status}: {message}"))
        self.client.set_terminated(self.run_id, status.upper())


def _mlflow_key(key: str) -> str:
    """A param name MLflow accepts: letters, digits, _ - . / : and space, at most 250 characters."""
    return re.sub(r"[^\w\-./: ]", "_", key)[:MLFLOW_KEY_LENGTH]


def _cut(text: str, limit: int = MLFLOW_PARAM_LENGTH) -> str:
    return text if len(text) <= limit else text[: limit - 15] + " ...(truncated)"


def _write_json(path: Path, value: dict) -> None:
    """Write atomically (a temporary file beside it, then a rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class TrackioTracker:
    """A trackio run in its local SQLite store, ``run_dir/trackio`` unless $TRACKIO_DIR names
    another (or $TRACKIO_SERVER_URL / $TRACKIO_SPACE_ID a server): metrics by step, the
    configuration, report.md and loss.png as artifacts; a failed or killed run adds an alert."""

    def __init__(self, run_dir: Path, resume: bool):
        import_tracker("trackio")
        self.directory = Path(os.environ.get("TRACKIO_DIR") or run_dir / "trackio").resolve()
        self.name, self._resume, self._run = run_dir.name, resume, None
        self.continued = False
        self.where = f"trackio project {PROJECT} in {self.directory}"
        self._last: dict[str, int] = {}
        _point_trackio_at(self.directory)
        from trackio.sqlite_storage import SQLiteStorage  # optional: trackio

        if resume:  # the points its run already has
            for entry in SQLiteStorage.get_logs(PROJECT, self.name):
                for key in entry:
                    if key not in ("step", "timestamp"):
                        self._last[key] = max(self._last.get(key, -1), entry["step"])
        self.continued = bool(self._last)

    def _started(self) -> Any:
        """trackio.init at the first record of a continued run, with the configuration it has
        (trackio.init replaces a run's configuration with the one it is given)."""
        if self._run is None:
            from trackio.sqlite_storage import SQLiteStorage  # optional: trackio

            kept = SQLiteStorage.get_run_config(PROJECT, self.name) if self.continued else None
            self._open({k: v for k, v in (kept or {}).items() if not k.startswith("_")} or None)
        return self._run

    def _open(self, config: dict[str, Any] | None) -> None:
        import trackio  # optional: trackio

        with contextlib.redirect_stdout(io.StringIO()):  # its dashboard instructions: see docs/TRACKING.md
            self._run = trackio.init(project=PROJECT, name=self.name, config=config,
                                     resume="allow" if self._resume else "never", embed=False,
                                     auto_log_cpu=False, auto_log_gpu=False)

    def log(self, tags: dict[str, float], step: int) -> None:
        fresh = {key: value for key, value in tags.items() if step > self._last.get(key, -1)}
        if fresh:
            self._started().log(fresh, step=step)

    def log_config(self, config: dict[str, Any]) -> None:
        self._open(config)

    def log_artifacts(self, paths: list[Path]) -> None:
        for path in paths:
            self._started().log_artifact(path, type="report")

    def truncate_after(self, step: int) -> None:
        """Nothing to do: the points each metric already has are skipped (`log`)."""

    def close(self, status: str, message: str) -> None:
        import trackio  # optional: trackio

        run = self._started()
        level = trackio.AlertLevel.ERROR if status == "failed" else trackio.AlertLevel.WARN
        with contextlib.redirect_stdout(io.StringIO()):  # lorakit says how the run ended itself
            if status != "finished":
                run.alert(f"run {status}", text=message, level=level)
            if trackio.context_vars.current_run.get() is run:
                trackio.finish()
            else:
                run.finish()


def _point_trackio_at(directory: Path) -> None:
    """trackio reads its directory once, when imported ($TRACKIO_DIR, else the Hugging Face cache),
    into module constants that its modules copy. A run that writes under its own run directory (and
    a second run in the same process) points those constants at ``directory``, then checks that
    trackio's store is there: never the user's cache unless $TRACKIO_DIR says so."""
    import trackio.utils as settings  # optional: trackio
    from trackio.sqlite_storage import SQLiteStorage  # optional: trackio

    old = {name: getattr(settings, name) for name in ("TRACKIO_DIR", "MEDIA_DIR", "ARTIFACTS_DIR")}
    new = {"TRACKIO_DIR": directory, "MEDIA_DIR": directory / "media", "ARTIFACTS_DIR": directory / "artifacts"}
    for module in [m for n, m in list(sys.modules.items()) if n == "trackio" or n.startswith("trackio.")]:
        for name, path in old.items():
            if getattr(module, name, None) == path:
                setattr(module, name, new[name])
    if SQLiteStorage.get_project_db_path(PROJECT).parent != directory:
        raise ConfigError(f"report_to=trackio: this trackio version keeps its store elsewhere than {directory}; "
                          f"set $TRACKIO_DIR={directory}, or install the version lorakit supports: {INSTALL}")
