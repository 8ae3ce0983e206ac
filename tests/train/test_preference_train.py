"""`lorakit train --method dpo|orpo` on a tiny model: the run directory, its metrics and adapter."""

import json

import pytest
import torch

from lorakit import PeftModel
from lorakit.train import train
from lorakit.train.report import read_metrics


@pytest.mark.parametrize("method", ["dpo", "orpo"])
def test_a_preference_run_writes_a_normal_adapter_and_its_reward_metrics(tiny_config, method):
    config = tiny_config(method=method, data="task-api-prefs", target_modules=["q_proj", "v_proj"])
    result = train(config, progress=False)
    run = config.run_dir
    metrics = read_metrics(f"{run}/metrics.jsonl")
    steps = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4, 5, 6]
    for m in steps:
        assert {"loss", "rewards_chosen", "rewards_rejected", "reward_margin", "reward_accuracy"} <= m.keys()
        assert m["reward_margin"] == pytest.approx(m["rewards_chosen"] - m["rewards_rejected"], abs=1e-6)
    evals = [m for m in metrics if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [0, 3, 6]
    assert all("eval_reward_accuracy" in m for m in evals)
    config_json = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and not (result.adapter_dir / "ref").exists()
    report = (result.run_dir / "report.md").read_text()
    assert method.upper() in report and "reward accuracy" in report
    # a normal PEFT adapter: PEFT loads it and computes lorakit's logits
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 17, 300, 42, 9, 1000]])
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.model),
                                            str(result.adapter_dir)).eval()
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.model), str(result.adapter_dir)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
        with ours.disable_adapter():
            assert not torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)


def test_a_dpo_run_interrupted_then_resumed_equals_an_uninterrupted_one(tiny_config, tmp_path, monkeypatch):
    from .test_resume import adapter_tensors, assert_bitwise_equal, signal_at_step
    from lorakit import TrainingInterrupted

    common = dict(method="dpo", data="task-api-prefs", max_steps=5, save_every=0, score_examples=0,
                  target_modules=["q_proj", "v_proj"])
    straight = train(tiny_config(run_dir=str(tmp_path / "straight"), **common), progress=False)
    signal_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        train(tiny_config(run_dir=str(tmp_path / "cut"), **common), progress=False)
    monkeypatch.undo()
    resumed = train(tiny_config(run_dir=str(tmp_path / "cut"), **common), resume=True, progress=False)
    assert resumed.steps == 5
    assert_bitwise_equal(adapter_tensors(resumed.run_dir), adapter_tensors(straight.run_dir))
    losses = lambda run: [m["loss"] for m in read_metrics(f"{run}/metrics.jsonl") if m["kind"] == "train"]  # noqa: E731
    assert losses(resumed.run_dir) == losses(straight.run_dir)


def test_dpo_from_an_sft_adapter_starts_there_and_keeps_it_as_the_reference(tiny_config, tmp_path):
    sft = train(tiny_config(run_dir=str(tmp_path / "sft"), max_steps=3, score_examples=0,
                            target_modules=["q_proj", "v_proj"]), progress=False)
    config = tiny_config(run_dir=str(tmp_path / "dpo"), method="dpo", data="task-api-prefs", max_steps=3,
                         score_examples=0, init_adapter=str(sft.adapter_dir), r=None, target_modules=None,
                         eval_every=0)
    assert config.lora.r == 4 and sorted(config.lora.target_modules) == ["q_proj", "v_proj"]
    result = train(config, progress=False)
    evals = [m for m in read_metrics(f"{result.run_dir}/metrics.jsonl") if m["kind"] == "eval"]
    # at step 0 the policy is its reference (the SFT adapter): the DPO loss is log 2 exactly
    assert evals[0]["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert evals[0]["eval_rewards_chosen"] == 0.0
    sft_tensors, dpo_tensors = _tensors(sft.adapter_dir), _tensors(result.adapter_dir)
    assert sft_tensors.keys() == dpo_tensors.keys()
    assert any(not torch.equal(sft_tensors[k], dpo_tensors[k]) for k in sft_tensors)
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def _tensors(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))


@pytest.mark.parametrize("settings,message", [
    (dict(method="dpo", loss_type="kto"), "loss_type='kto'"),
    (dict(method="dpo", loss_type=["sigmoid", "sigmoid"]), "or a list of different ones"),
    (dict(method="dpo", loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "one number >= 0 per loss_type"),
    (dict(method="orpo", loss_type="ipo"), "apply to method dpo only"),
    (dict(method="dpo", label_smoothing=0.1), "used by loss_type robust only"),
    (dict(method="dpo", loss_type="robust", label_smoothing=0.5), r"label_smoothing=0.5: must be a number in \[0, 0.5\)"),
    (dict(method="dpo", beta=0), "beta=0: must be a positive number"),
    (dict(method="orpo", reference_free=True), "reference_free: applies to method dpo only"),
    (dict(method="dpo", init_lora_weights="pissa"), "PiSSA/OLoRA rewrite the base weights"),
    (dict(method="adalora", init_adapter="x"), "init_adapter: starts a lora, dpo or orpo run"),
])
def test_bad_preference_settings_are_refused_by_name(tiny_config, settings, message):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        tiny_config(data="task-api-prefs", **settings)


def test_an_init_adapter_with_adapter_options_or_no_adapter_is_refused(tiny_config, tmp_path):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="the adapter's settings come from it; drop r, target_modules"):
        tiny_config(method="dpo", init_adapter=str(tmp_path))
    with pytest.raises(ConfigError, match="no adapter_config.json"):
        tiny_config(method="dpo", init_adapter=str(tmp_path), r=None, target_modules=None)


def test_dpo_on_supervised_data_names_the_preference_set(tiny_config):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="task-api-prefs"):
        train(tiny_config(method="dpo", data="task-api"), progress=False)


def test_dpo_on_a_4bit_base_takes_the_quantized_model_without_its_adapter_as_reference(tiny_config):
    pytest.importorskip("bitsandbytes")
    config = tiny_config(method="dpo", data="task-api-prefs", quantize="nf4", max_steps=3, score_examples=0,
                         target_modules=["q_proj", "v_proj"])
    result = train(config, progress=False)
    metrics = read_metrics(f"{result.run_dir}/metrics.jsonl")
    first = next(m for m in metrics if m["kind"] == "eval")
    assert first["eval_loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at step 0
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3]
    assert "nf4" in (result.run_dir / "report.md").read_text()
