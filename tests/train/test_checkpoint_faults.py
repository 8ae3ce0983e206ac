"""Faults around checkpoints and run directories: spoiled manifests, writes a kill left half
done, a run killed before it started, a full disk."""

import errno
import json
import shutil

import pytest
import yaml
from safetensors import SafetensorError

import lorakit.io as io
import lorakit.train.checkpoint as checkpoint
from lorakit.cli import main
from lorakit.errors import CheckpointError, DiskFullError
from lorakit.train import TrainConfig, train
from lorakit.train.config import load_train_config
from lorakit.train.checkpoint import latest_checkpoint, load_checkpoint, remove_stale_tmp, verify_checkpoint
from lorakit.train.report import MetricsLog

from .test_resume import adapter_tensors, assert_bitwise_equal

COMMON = dict(max_steps=6, save_every=2, keep_checkpoints=0, score_examples=0, lora_dropout=0.1, eval_every=0)


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """One run of 6 steps with checkpoints at steps 2 and 4, copied by each test that spoils it."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    config = TrainConfig.from_settings(model=str(tiny_model_dir), data="task-api", train_examples=48, batch_size=8,
                                       learning_rate=3e-2, r=4, target_modules=["q_proj", "v_proj"],
                                       eval_examples=8, max_new_tokens=6, log_every=1, precision="fp32",
                                       run_dir=str(run_dir), name="tiny", **COMMON)
    train(config, progress=False)
    return run_dir


def copy_run(finished_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config["run_dir"] = str(run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run_dir


def digest(run_dir, name):
    return json.loads((run_dir / "checkpoints" / "step-000004" / "manifest.json").read_text())[name]


SPOILED_MANIFESTS = {
    "a list": (lambda run: [1, 2], "not an object"),
    "null": (lambda run: None, "not an object"),
    "a string": (lambda run: "x", "not an object"),
    "empty": (lambda run: {}, "does not list"),
    "a file missing": (lambda run: {n: digest(run, n) for n in checkpoint.CHECKPOINT_FILES[1:]}, "does not list"),
    "an unknown entry": (lambda run: {**{n: digest(run, n) for n in checkpoint.CHECKPOINT_FILES},
                                      "notes.txt": "0" * 64}, "'notes.txt'"),
    "a file outside": (lambda run: {**{n: digest(run, n) for n in checkpoint.CHECKPOINT_FILES},
                                    "../step-000002/state.json": "0" * 64}, "'../step-000002/state.json'"),
    "an absolute path": (lambda run: {**{n: digest(run, n) for n in checkpoint.CHECKPOINT_FILES},
                                      "/etc/hostname": "0" * 64}, "'/etc/hostname'"),
    "a hash not a string": (lambda run: {**{n: digest(run, n) for n in checkpoint.CHECKPOINT_FILES},
                                         "state.json": [1]}, "not a sha256"),
}


@pytest.mark.parametrize("kind", list(SPOILED_MANIFESTS))
def test_a_spoiled_manifest_fails_verification_and_the_older_checkpoint_is_used(finished_run, tmp_path, kind):
    run_dir = copy_run(finished_run, tmp_path)
    make, reason = SPOILED_MANIFESTS[kind]
    newest = run_dir / "checkpoints" / "step-000004"
    (newest / "manifest.json").write_text(json.dumps(make(run_dir)))
    assert reason in verify_checkpoint(newest)
    with pytest.warns(UserWarning, match=f"step-000004 is not usable .*{reason.replace('.', '[.]')}"):
        assert latest_checkpoint(run_dir).name == "step-000002"
    with pytest.raises(CheckpointError, match="step-000004"):
        load_checkpoint(newest, optimizer=None)


def test_resume_passes_over_a_manifest_that_is_a_list_and_ends_bitwise_equal(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    (run_dir / "checkpoints" / "step-000004" / "manifest.json").write_text("[1, 2]")
    with pytest.warns(UserWarning, match="step-000004 is not usable"):
        resumed = train(load_train_config(run_dir / "config.yaml"), resume=True, progress=False)
    assert "resuming from" in capsys.readouterr().out and resumed.steps == 6
    assert_bitwise_equal(adapter_tensors(run_dir), adapter_tensors(finished_run))


def test_resume_removes_only_lorakits_own_unfinished_writes(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    checkpoints = run_dir / "checkpoints"
    stale = [checkpoints / ".tmp-step-000006-k3j2h1g0", checkpoints / ".tmp-replaced-step-000004-a1b2c3d4",
             run_dir / ".tmp-adapter-x9y8z7w6"]
    for path in stale:
        (path / "adapter").mkdir(parents=True)
        (path / "adapter" / "adapter_model.safetensors").write_bytes(b"half a file")
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "precious").mkdir(parents=True)
    kept = [checkpoints / ".tmp-mine", checkpoints / "notes", run_dir / ".tmp-step-000006-k3j2h1g0.txt"]
    kept[0].mkdir()
    kept[1].mkdir()
    kept[2].write_text("a file, not a directory lorakit made")
    link = checkpoints / ".tmp-step-000008-zzzzzzzz"
    link.symlink_to(elsewhere, target_is_directory=True)

    train(load_train_config(run_dir / "config.yaml"), resume=True, progress=False)
    assert "removed 3 unfinished write(s)" in capsys.readouterr().out
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept) and link.is_symlink() and (elsewhere / "precious").is_dir()
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.startswith(".tmp-step")) == [link.name]


def test_a_checkpoint_write_removes_the_unfinished_writes_before_it(tmp_path):
    stale = tmp_path / ".tmp-step-000002-abcdefgh"
    stale.mkdir()
    assert remove_stale_tmp(tmp_path) == [stale] and not stale.exists()
    assert remove_stale_tmp(tmp_path / "absent") == []


def test_resuming_a_run_killed_before_its_config_was_written_says_how_to_start_it(tmp_path, capsys):
    run_dir = tmp_path / "never"
    run_dir.mkdir()  # the kill came between making the directory and writing config.yaml
    assert main(["train", "--resume", str(run_dir), "--max-steps", "3", "--no-packing"]) == 2
    err = capsys.readouterr().err
    assert "the run never started" in err and "config.yaml is missing" in err and "nothing to resume" in err
    assert f"start it again with: lorakit train --run-dir {run_dir} --max-steps 3 --no-packing" in err

    (run_dir / "config.yaml").write_text("model: [unclosed\n")  # a partial file from before writes were atomic
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml is incomplete" in err and f"lorakit train --run-dir {run_dir} <the options" in err

    assert main(["train", "--resume", str(tmp_path / "absent")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_resuming_a_run_killed_before_its_first_checkpoint_says_how_to_start_it(tiny_config, tmp_path, capsys):
    config = tiny_config(**COMMON)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config.run_dir = str(run_dir)
    config.save(run_dir / "config.yaml")
    assert main(["train", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "stopped before its first checkpoint (it saves one every 2 steps)" in err
    assert f"start it again with: lorakit train --config {run_dir / 'config.yaml'}" in err


def test_config_yaml_is_written_atomically(tiny_config, tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    tiny_config(max_steps=3).save(path)
    before = path.read_text()

    def killed(src, dst):
        raise KeyboardInterrupt  # stands for a kill between writing and renaming
    monkeypatch.setattr("lorakit.train.config.os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        tiny_config(max_steps=5).save(path)
    assert path.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def safetensors_no_space(tensors, path, *args, **kwargs):
    if path.endswith("optimizer.safetensors"):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return real_save_file(tensors, path, *args, **kwargs)


real_save_file = checkpoint.save_file


def test_a_full_disk_at_the_final_adapter_names_it_and_leaves_no_adapter_directory(tiny_config, tmp_path,
                                                                                      monkeypatch):
    monkeypatch.setattr(io, "save_file", no_space)
    config = tiny_config(max_steps=2, save_every=0, score_examples=0)
    with pytest.raises(DiskFullError) as caught:
        train(config, progress=False)
    run_dir = tmp_path / "run"
    message = str(caught.value)
    assert f"to write the adapter {run_dir / 'adapter'}" in message and "it needs about" in message
    assert "free there" in message and "--output-dir" in message
    assert not (run_dir / "adapter").exists() and not [p for p in run_dir.iterdir() if p.name.startswith(".tmp")]


def test_a_full_disk_at_a_checkpoint_names_it_and_leaves_nothing_half_written(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", safetensors_no_space)
    with pytest.raises(DiskFullError) as caught:
        train(tiny_config(max_steps=4, save_every=2, score_examples=0), progress=False)
    checkpoints = tmp_path / "run" / "checkpoints"
    message = str(caught.value)
    assert f"to write the checkpoint {checkpoints / 'step-000002'}" in message and "it needs about" in message
    assert "--keep-checkpoints" in message and "--run-dir" in message
    assert list(checkpoints.iterdir()) == []


def test_a_full_disk_at_config_yaml_and_at_the_metrics_is_a_typed_error_on_the_command_line(
        tiny_config, tmp_path, monkeypatch, capsys):
    real_write_text = type(tmp_path).write_text

    def write_text(self, *args, **kwargs):
        if self.name == ".config.yaml.tmp":
            no_space()
        return real_write_text(self, *args, **kwargs)

    flags = ["train", "--model", tiny_config().model, "--max-steps", "2", "--train-examples", "16",
             "--batch-size", "8", "--score-examples", "0", "--no-progress"]
    with monkeypatch.context() as patched:
        patched.setattr(type(tmp_path), "write_text", write_text)
        assert main(flags + ["--run-dir", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert f"error: no space left on the device to write the run's config {tmp_path / 'a' / 'config.yaml'}" in err

    monkeypatch.setattr(MetricsLog, "write", no_space)
    assert main(flags + ["--run-dir", str(tmp_path / "b")]) == 1
    assert f"error: no space left on the device to write {tmp_path / 'b'}: free some space" in capsys.readouterr().err
