"""`lorakit train / eval / generate`: flags over the config file, exit codes, printed results."""

import os
import signal

import pytest
import yaml

import lorakit.train.loop as loop
from lorakit.cli import main


def write_yaml(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def test_train_flags_win_over_the_config_file_and_the_resolved_config_is_saved(tiny_config, tmp_path, capsys):
    base = {k: v for k, v in tiny_config().to_dict().items() if k != "extra"}
    config_file = write_yaml(tmp_path / "run.yaml", **{**base, "max_steps": 5, "learning_rate": 0.5})
    run_dir = tmp_path / "cli-run"
    code = main(["train", "--config", str(config_file), "--max-steps", "2", "--lr", "0.01",
                 "--run-dir", str(run_dir), "--score-examples", "2", "--no-progress"])
    assert code == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["learning_rate"] == 0.01  # flags win
    assert saved["lora"]["r"] == base["lora"]["r"] == 4  # the file wins over defaults
    out = capsys.readouterr().out
    assert f"adapter: {run_dir / 'adapter'}" in out and "held-out exact match" in out

    code = main(["eval", "--adapter", str(run_dir / "adapter"), "--examples", "3", "--max-new-tokens", "4"])
    assert code == 0
    assert "exact match" in capsys.readouterr().out

    code = main(["generate", "--adapter", str(run_dir / "adapter"), "--prompt", "hello",
                 "--prompt", "remind me to call mom", "--max-new-tokens", "3"])
    assert code == 0
    assert capsys.readouterr().out.count("\n") >= 2  # one completion per prompt (a random model's may be empty)


def test_every_command_prints_its_help(capsys):
    for command in ("train", "eval", "generate", "serve", "compare", "merge"):
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: lorakit {command}")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "%" in out and "%%" not in out  # the TrainConfig docstrings' percentages, as written


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["train", "--lr", "5", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "learning_rate=5" in err and "Traceback" not in err
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "no such config file" in capsys.readouterr().err
    bad = write_yaml(tmp_path / "bad.yaml", learning_rte=0.1)
    assert main(["train", "--config", str(bad)]) == 2
    assert "learning_rte" in capsys.readouterr().err


def test_an_interrupted_run_exits_130_and_resumes(tiny_config, tmp_path, monkeypatch, capsys):
    real = loop.lr_at

    def lr_at(step, **kwargs):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(step, **kwargs)

    monkeypatch.setattr(loop, "lr_at", lr_at)
    base = {k: v for k, v in tiny_config(score_examples=0, max_steps=4).to_dict().items() if k != "extra"}
    config_file = write_yaml(tmp_path / "run.yaml", **base)
    run_dir = tmp_path / "cli-run"
    assert main(["train", "--config", str(config_file), "--run-dir", str(run_dir), "--no-progress"]) == 130
    assert "lorakit train --resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_train_help_prints_every_flag(capsys):
    """argparse formats help text with %: the docstrings' "10%" must not crash it."""
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert all(flag in out for flag in ("--r R", "--lora-alpha", "--use-dora", "--method", "warm-up 10% of"))
