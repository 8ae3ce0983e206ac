"""End to end on a tiny model: the loss falls, the run directory is complete, the adapter loads in PEFT."""

import json
import math
import signal

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit.train.objectives as objectives
from lorakit import PeftModel, TrainingError
from lorakit.train import train
from lorakit.train.report import read_metrics


def test_loss_falls_and_the_run_directory_is_complete(tiny_config, capsys):
    result = train(tiny_config(max_steps=12, train_examples=96), progress=False)
    printed = capsys.readouterr().out
    run = result.run_dir
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "report.md", "adapter/adapter_model.safetensors"):
        assert (run / name).is_file(), name
    metrics = read_metrics(run / "metrics.jsonl")
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    evals = [m["eval_loss"] for m in metrics if m["kind"] == "eval"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    assert evals[-1] < evals[0]
    assert [m["phase"] for m in metrics if m["kind"] == "score"] == ["before", "after"]
    report = (run / "report.md").read_text()
    assert "untuned model" in report and "Trainable parameters" in report and "task-api" in report
    # the data summary, printed before the first step and kept in the report
    summary = "task-api: 2,000 records read (chat 2,000), 2,000 examples kept"
    assert summary in printed and summary in report
    assert "task-api (held-out): 200 records read (chat 200), 200 examples kept" in report
    assert result.summary["steps"] == 12


def test_the_trained_adapter_loads_in_peft_with_identical_outputs(tiny_config, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    result = train(tiny_config(max_steps=3, score_examples=0), progress=False)
    weights = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # it trained
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            str(result.adapter_dir))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-6
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=ids).logits, a)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    real = objectives.loss_sum  # what the training step calls (SupervisedObjective, through distributed.LossModule)
    calls = {"n": 0}

    def poisoned(model, batch):
        calls["n"] += 1
        loss, count = real(model, batch)
        return (loss * float("nan"), count) if calls["n"] == 4 else (loss, count)

    monkeypatch.setattr(objectives, "loss_sum", poisoned)
    config = tiny_config(eval_examples=None, eval_every=0, score_examples=0)
    with pytest.raises(TrainingError, match="step 4") as err:
        train(config, progress=False)
    assert "step-000002" in str(err.value) and "learning rate" in str(err.value)
    run = config.run_dir
    metrics = read_metrics(f"{run}/metrics.jsonl")
    assert max(m["step"] for m in metrics if m["kind"] == "train") == 3
    assert all(m["loss"] is not None for m in metrics if m["kind"] == "train")


def test_bad_records_are_skipped_counted_and_reported(tiny_config, tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}
    lines = [json.dumps(good)] * 20 + ["{not json", json.dumps({"messages": []}),
                                         json.dumps({"messages": [{"role": "user", "content": "no answer"}]})]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    config = tiny_config(data=str(data), val_fraction=0.2, skip_bad_records=True, max_steps=2, train_examples=None,
                         score_examples=0)
    result = train(config, progress=False)
    report = (result.run_dir / "report.md").read_text()
    assert "invalid_json: 1" in report and "empty_messages: 1" in report and "no_assistant_turn: 1" in report
