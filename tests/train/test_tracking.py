"""`lorakit train --report-to tensorboard,mlflow,trackio`: every metrics.jsonl value, the
configuration, report.md and loss.png and the run's end, read back with each library's own
reader; a bad name and a missing library are one-line ConfigErrors; a failed run ends FAILED and
a resumed one continues the same tracker runs without logging a step twice."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import yaml

import lorakit.train.loop as loop
import lorakit.train.objectives as objectives
import lorakit.train.setup as setup
from lorakit import ConfigError, TrainingError, TrainingInterrupted
from lorakit.cli import build_parser, main
from lorakit.train import train
from lorakit.train.config import load_train_config
from lorakit.train.report import read_metrics

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")
pytest.importorskip("trackio")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from trackio import Api  # noqa: E402
from trackio.sqlite_storage import SQLiteStorage  # noqa: E402

ALL = "tensorboard,mlflow,trackio"


@pytest.fixture(autouse=True)
def local_stores(monkeypatch):
    """The trackers' own defaults, whatever this machine's environment says."""
    for name in ("TRACKIO_DIR", "TRACKIO_SERVER_URL", "TRACKIO_SPACE_ID", "MLFLOW_TRACKING_URI",
                 "MLFLOW_EXPERIMENT_NAME", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(name, raising=False)


def allow_reading_mlflow(monkeypatch):
    """MLflow 3 opens its file store only when allowed; lorakit allows it for its own writes and
    leaves the environment as it was."""
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def expected_points(run_dir):
    """{tag: {step: value}} for every number of metrics.jsonl, by the documented naming: kind/key,
    a score's phase as a suffix, and train/tokens_per_second = tokens / elapsed_s."""
    points = {}
    for record in read_metrics(run_dir / "metrics.jsonl"):
        suffix = f"_{record['phase']}" if "phase" in record else ""
        for key, value in record.items():
            if key not in ("kind", "step", "phase") and isinstance(value, (int, float)):
                points.setdefault(f"{record['kind']}/{key}{suffix}", {})[record["step"]] = value
        if record["kind"] == "train":
            points.setdefault("train/tokens_per_second", {})[record["step"]] = record["tokens"] / record["elapsed_s"]
    return points


def tensorboard_points(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def mlflow_run(run_dir):
    saved = json.loads((run_dir / "tracking.json").read_text())["mlflow"]
    client = MlflowClient(saved["tracking_uri"])
    return client, client.get_run(saved["run_id"])


def mlflow_points(client, run):
    return {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
            for key in run.data.metrics}


def trackio_points(run_dir):
    """trackio's logs of the run; its store is the one the last run pointed trackio at."""
    assert SQLiteStorage.get_project_db_path("lorakit") == run_dir / "trackio" / "lorakit.db"
    points = {}
    for entry in SQLiteStorage.get_logs("lorakit", run_dir.name):
        for key, value in entry.items():
            if key not in ("step", "timestamp"):
                points.setdefault(key, []).append((entry["step"], value))
    return points


TIMES = ("train/elapsed_s", "train/tokens_per_second")


def assert_every_point_once(found, expected, rel, where, kept=()):
    """Each tag has exactly the expected steps, once each, with the expected values; at the steps
    ``kept`` (logged by a failed session, trained again by its resume, and kept by a tracker that
    cannot delete a point) the times are the first session's."""
    assert set(found) == set(expected), where
    for tag, by_step in expected.items():
        steps = [step for step, _ in found[tag]]
        assert sorted(steps) == sorted(by_step), f"{where} {tag}: steps {steps}, expected {sorted(by_step)}"
        for step, value in found[tag]:
            if not (tag in TIMES and step in kept):
                assert value == pytest.approx(by_step[step], rel=rel), f"{where} {tag} at step {step}"


def test_every_metric_the_config_and_the_report_reach_every_tracker(tiny_config, capsys, monkeypatch):
    config = tiny_config(report_to=ALL)
    result = train(config, progress=False)
    allow_reading_mlflow(monkeypatch)
    run_dir, steps = result.run_dir, result.steps
    assert "tracking: tensorboard --logdir" in capsys.readouterr().out
    expected = expected_points(run_dir)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_second",
                "eval/eval_loss", "score/exact_before", "score/exact_after", "score/title_after"):
        assert tag in expected, tag
    assert sorted(expected["eval/eval_loss"]) == [0, 3, steps]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["report_to"] == ["tensorboard", "mlflow", "trackio"] and saved["tracking_uri"] is None

    events, scalars = tensorboard_points(run_dir)
    assert_every_point_once(scalars, expected, 1e-6, "tensorboard")  # stored as float32
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["learning_rate"].number_value == pytest.approx(3e-2) and hparams["lora.r"].number_value == 4
    assert hparams["name"].string_value == "tiny" and hparams["report_to"].string_value == str(saved["report_to"])
    report = events.Tensors("report.md/text_summary")[0]
    assert report.step == steps and report.tensor_proto.string_val[0].decode() == (run_dir / "report.md").read_text()
    image = events.Images("loss.png")[0]
    assert (image.width, image.height) == (700, 400)

    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.info.artifact_uri.startswith((run_dir / "mlruns").resolve().as_uri())
    assert_every_point_once(mlflow_points(client, run), expected, 1e-12, "mlflow")
    params = run.data.params
    assert params["learning_rate"] == "0.03" and params["lora.r"] == "4" and params["max_steps"] == "6"
    assert params["lora.target_modules"] == str(saved["lora"]["target_modules"])
    assert params["val_file"] == "None" and params["run_dir"] == str(run_dir)
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["loss.png", "report.md"]

    assert_every_point_once(trackio_points(run_dir), expected, 1e-12, "trackio")
    stored = SQLiteStorage.get_run_config("lorakit", run_dir.name)
    assert stored["learning_rate"] == 0.03 and stored["lora"]["r"] == 4 and stored["report_to"] == saved["report_to"]
    record = SQLiteStorage.get_latest_run_record_by_name("lorakit", run_dir.name)
    artifacts = SQLiteStorage.get_run_artifacts("lorakit", run_dir.name, record["id"])["output"]
    assert sorted(a["name"].rsplit("-", 1)[-1] for a in artifacts) == ["loss.png", "report.md"]


def test_report_to_is_comma_separated_on_the_command_line_a_variable_and_a_list_in_the_file(tmp_path, capsys):
    args = build_parser({}).parse_args(["train", "--report-to", "tensorboard,MLflow"])
    assert load_train_config(None, report_to=args.report_to).report_to == ["tensorboard", "mlflow"]
    args = build_parser({"LORAKIT_REPORT_TO": "trackio"}).parse_args(["train"])
    assert load_train_config(None, report_to=args.report_to).report_to == ["trackio"]
    assert load_train_config(None, report_to="none").report_to == []
    path = tmp_path / "config.yaml"
    path.write_text("report_to: [mlflow]\ntracking_uri: http://127.0.0.1:5000\n")
    assert load_train_config(path).report_to == ["mlflow"]
    with pytest.raises(SystemExit):
        build_parser({}).parse_args(["train", "--help"])
    assert "--report-to NAME[,NAME] Experiment trackers" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("value, words", [
    ("wandb", "report_to=['wandb']: unknown tracker 'wandb'; the trackers are tensorboard, mlflow, trackio, or none"),
    ("tensorboard,comet", "unknown tracker 'comet'"),
])
def test_a_bad_report_to_value_is_a_config_error_naming_it_and_the_trackers(tmp_path, capsys, value, words):
    with pytest.raises(ConfigError, match="unknown tracker"):
        load_train_config(None, report_to=value)
    assert main(["train", "--report-to", value, "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_tracking_uri_without_mlflow_is_a_config_error():
    with pytest.raises(ConfigError, match="tracking_uri=http://x: MLflow's server; add mlflow to report_to"):
        load_train_config(None, report_to="tensorboard", tracking_uri="http://x")


@pytest.mark.parametrize("library", ["tensorboard", "mlflow", "trackio"])
def test_a_missing_library_is_one_line_before_the_model_is_loaded(tiny_config, monkeypatch, capsys, library):
    monkeypatch.setitem(sys.modules, library, None)  # import mlflow -> ImportError, as when it is not installed

    def not_reached(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing tracker was reported")

    monkeypatch.setattr(setup, "load_model", not_reached)
    config = tiny_config(report_to=library)
    with pytest.raises(ConfigError) as err:
        train(config, progress=False)
    assert str(err.value) == (f"report_to={library}: the {library} package is not installed; install the trackers "
                              "with: pip install 'lorakit[tracking]'")
    assert main(["train", "--report-to", library, "--run-dir", config.run_dir, "--no-progress"]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert not Path(config.run_dir).exists()


def poison_step(monkeypatch, step):
    """The loss of optimizer step ``step`` becomes NaN (one micro-batch a step): a TrainingError."""
    real, calls = objectives.loss_sum, {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, count = real(model, batch)
        return (loss * float("nan"), count) if calls["n"] == step else (loss, count)

    monkeypatch.setattr(objectives, "loss_sum", poisoned)


def test_a_failed_run_ends_failed_and_its_resume_continues_the_same_runs_without_a_step_twice(
        tiny_config, monkeypatch):
    config = tiny_config(report_to=ALL, score_examples=0)
    with pytest.MonkeyPatch.context() as patch, pytest.raises(TrainingError, match="step 4"):
        poison_step(patch, 4)  # steps 1-3 logged, the last checkpoint at step 2
        train(config, progress=False)
    run_dir = Path(config.run_dir)
    allow_reading_mlflow(monkeypatch)
    client, failed = mlflow_run(run_dir)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["lorakit.ended"].startswith("failed: TrainingError: the training loss became nan")
    assert [m.step for m in client.get_metric_history(failed.info.run_id, "train/loss")] == [1, 2, 3]
    assert [a["level"] for a in Api().alerts("lorakit", run_dir.name)] == ["error"]

    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    resumed = train(load_train_config(run_dir / "config.yaml"), resume=True, progress=False)
    assert resumed.steps == 6
    allow_reading_mlflow(monkeypatch)
    client, run = mlflow_run(run_dir)
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    expected = expected_points(run_dir)
    assert sorted(expected["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert_every_point_once(mlflow_points(client, run), expected, 1e-9, "mlflow", kept={3})
    _, scalars = tensorboard_points(run_dir)
    assert_every_point_once(scalars, expected, 1e-6, "tensorboard")  # step 3 purged, logged again
    assert_every_point_once(trackio_points(run_dir), expected, 1e-9, "trackio", kept={3})
    assert len(Api().runs("lorakit")) == 1


def test_an_interrupted_run_ends_killed_in_the_store_tracking_uri_names(tiny_config, monkeypatch, tmp_path):
    real = loop.lr_at

    def lr_at(step, **kwargs):  # SIGINT during the second step: a checkpoint, then TrainingInterrupted
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(step, **kwargs)

    monkeypatch.setattr(loop, "lr_at", lr_at)
    store = (tmp_path / "team-mlruns").as_uri()  # a server's address in real use
    config = tiny_config(report_to="mlflow", tracking_uri=store, score_examples=0, eval_examples=None, eval_every=0)
    with pytest.raises(TrainingInterrupted, match="step 2"):
        train(config, progress=False)
    allow_reading_mlflow(monkeypatch)
    client, run = mlflow_run(Path(config.run_dir))
    assert client.tracking_uri == store and not (Path(config.run_dir) / "mlruns").exists()
    assert run.info.status == "KILLED" and run.data.tags["lorakit.ended"].startswith("killed: TrainingInterrupted")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
