"""`lorakit train --quantize`: a run on a 4-bit base trains, records its base, resumes bit for bit, and
merges into the dequantized base (`lorakit merge`)."""

import json

import pytest
import torch

pytest.importorskip("bitsandbytes")

from transformers import AutoModelForCausalLM  # noqa: E402

from lorakit import ConfigError, PeftModel, TrainingInterrupted  # noqa: E402
from lorakit.infer.merge import merge_adapter  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.models.quantized import base_quantization  # noqa: E402
from lorakit.plan import inspect_adapter  # noqa: E402
from lorakit.plan.report import format_inspection  # noqa: E402
from lorakit.train import TrainConfig, train  # noqa: E402

from .test_resume import adapter_tensors, assert_bitwise_equal, signal_at_step  # noqa: E402

QLORA = dict(quantize="nf4", target_modules=["q_proj", "v_proj", "up_proj"], save_every=0, score_examples=0)

def test_a_4bit_run_trains_records_its_base_and_resumes_bit_for_bit(tiny_config, tmp_path, monkeypatch, capsys):
    straight = train(tiny_config(run_dir=str(tmp_path / "straight"), **QLORA), progress=False)
    run = tmp_path / "straight"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert "fused LoRA node: off for the 6 layers on the nf4 base" in capsys.readouterr().out
    assert base_quantization(run / "adapter") == "nf4"
    assert "frozen base quantized to nf4" in (run / "report.md").read_text()
    assert "trained on its nf4 quantization (QLoRA)" in format_inspection(inspect_adapter(run / "adapter"))
    assert straight.adapter_dir == run / "adapter"

    signal_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        train(tiny_config(run_dir=str(tmp_path / "interrupted"), **QLORA), progress=False)
    monkeypatch.undo()
    train(tiny_config(run_dir=str(tmp_path / "interrupted"), **QLORA), resume=True, progress=False)
    assert_bitwise_equal(adapter_tensors(tmp_path / "interrupted"), adapter_tensors(run))

@pytest.mark.parametrize("dtype, max_error", [("fp32", 1e-4), ("bf16", 0.5)])
def test_merge_writes_the_dequantized_base_plus_the_update(tiny_config, tiny_model_dir, tmp_path, dtype, max_error):
    train(tiny_config(run_dir=str(tmp_path / "run"), learning_rate=1e-2, **QLORA), progress=False)
    report = merge_adapter(tmp_path / "run" / "adapter", tmp_path / "merged", model=str(tiny_model_dir), dtype=dtype)
    check = report.quantized
    assert check is not None and check.precision == "nf4" and check.positions > 20
    assert check.max_logit_error < max_error and check.top1_agreement >= (1.0 if dtype == "fp32" else 0.9)
    assert "trained on the nf4 base: merged into its dequantized weights" in report.summary()
    # a plain transformers model, as the quantized model with the adapter computes
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()

    quantized = PeftModel.from_pretrained(load_model(tiny_model_dir, quantize="nf4")[0],
                                          str(tmp_path / "run" / "adapter")).eval()
    ids = torch.tensor([[1, 5, 9, 33, 7, 100, 42, 3000]])
    with torch.no_grad():
        error = (merged(input_ids=ids).logits - quantized(input_ids=ids).logits).abs().max()
    assert error < max_error

def test_quantize_takes_nf4_fp4_or_int8(tiny_config):
    with pytest.raises(ConfigError, match=r"quantize='q3': must be one of nf4, fp4, int8, or unset"):
        tiny_config(quantize="q3")
    assert TrainConfig.from_settings(quantize="int8").quantize == "int8"
