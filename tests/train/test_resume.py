"""Interrupt and resume: the same adapter, bit for bit, as one uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import lorakit.train.loop as loop
import lorakit.train.objectives as objectives
from lorakit import TrainingInterrupted
from lorakit.train import train
from lorakit.train.checkpoint import latest_checkpoint


def adapter_tensors(run_dir):
    return load_file(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def signal_at_step(monkeypatch, step_index, signum=signal.SIGINT):
    """Send ourselves a signal while the loop computes step ``step_index`` (0-based)."""
    real = loop.lr_at

    def lr_at(step, **kwargs):
        if step == step_index:
            os.kill(os.getpid(), signum)
        return real(step, **kwargs)

    monkeypatch.setattr(loop, "lr_at", lr_at)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch, signum):
    # dropout on, so that the restored random state matters too
    common = dict(max_steps=6, lora_dropout=0.1, save_every=0, score_examples=0)
    straight = train(tiny_config(run_dir=str(tmp_path / "straight"), **common), progress=False)

    signal_at_step(monkeypatch, 2, signum)
    interrupted = tiny_config(run_dir=str(tmp_path / "interrupted"), **common)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        train(interrupted, progress=False)
    assert latest_checkpoint(tmp_path / "interrupted").name == "step-000003"
    monkeypatch.undo()
    resumed = train(tiny_config(run_dir=str(tmp_path / "interrupted"), **common), resume=True, progress=False)
    assert resumed.steps == 6
    assert_bitwise_equal(adapter_tensors(resumed.run_dir), adapter_tensors(straight.run_dir))
    steps = [line for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(steps) == 6  # no step logged twice


KILL_DURING_SECOND_CHECKPOINT = textwrap.dedent("""
    import os, signal, sys
    import lorakit.train.checkpoint as checkpoint
    from lorakit.train import TrainConfig, train

    real_save_file = checkpoint.save_file
    seen = []

    def save_file(tensors, path, *args, **kwargs):
        if path.endswith("optimizer.safetensors"):
            seen.append(path)
            if len(seen) == 2:  # the adapter of step 4 is written, its optimizer state is not
                os.kill(os.getpid(), signal.SIGKILL)
        return real_save_file(tensors, path, *args, **kwargs)

    checkpoint.save_file = save_file
    train(TrainConfig.from_settings(**eval(sys.argv[1])), progress=False)
""")


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tiny_config, tmp_path):
    common = dict(max_steps=6, save_every=2, score_examples=0, lora_dropout=0.1)
    straight = train(tiny_config(run_dir=str(tmp_path / "straight"), **common), progress=False)

    killed = tiny_config(run_dir=str(tmp_path / "killed"), **common)
    fields = {k: v for k, v in killed.to_dict().items() if k != "extra"}
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SECOND_CHECKPOINT, repr(fields)],
                          env={**os.environ}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    checkpoints = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".tmp")) == ["step-000002"]
    assert any(p.name.startswith(".tmp-step-000004") for p in checkpoints.iterdir())  # the half-written one

    resumed = train(tiny_config(run_dir=str(tmp_path / "killed"), **common), resume=True, progress=False)
    assert_bitwise_equal(adapter_tensors(resumed.run_dir), adapter_tensors(straight.run_dir))
    assert not list((tmp_path / "killed").rglob(".tmp-*"))  # the half-written one is removed on resume


def test_a_corrupted_checkpoint_is_passed_over_with_a_warning(tiny_config, tmp_path):
    config = tiny_config(max_steps=6, save_every=2, keep_checkpoints=3, score_examples=0)
    result = train(config, progress=False)
    newest = result.run_dir / "checkpoints" / "step-000004"
    (newest / "optimizer.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="does not match its hash"):
        assert latest_checkpoint(result.run_dir).name == "step-000002"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_final_evaluation_stops_at_once_and_keeps_the_adapter(tiny_config, tmp_path,
                                                                                 monkeypatch, signum):
    """After the last step the adapter is written first; a signal then stops the evaluation at
    once (a typed interruption saying so, exit 130 on the command line), not the default action."""
    real, calls = objectives.heldout_loss, []  # the held-out loss of a supervised run

    def heldout_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first is the measure before training
            os.kill(os.getpid(), signum)  # the handler raises here, inside the final evaluation
        return real(*args, **kwargs)

    monkeypatch.setattr(objectives, "heldout_loss", heldout_loss)
    config = tiny_config(run_dir=str(tmp_path / "run"), max_steps=4, save_every=2, score_examples=0, eval_every=0)
    with pytest.raises(TrainingInterrupted, match=r"after the last step \(4\).*adapter is saved.*step-000002"):
        train(config, progress=False)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "run" / "report.md").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
