"""`lorakit train --method adalora` on the tiny model of tests/train: it trains, the rank budget
falls to r per matrix, and the saved adapter loads in PEFT and in lorakit with equal outputs."""

import json

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.errors import ConfigError
from lorakit.train import TrainConfig, train
from lorakit.train.report import read_metrics
from lorakit.methods.adalora import AdaLoraConfig

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


def _config(tmp_path, tiny_model_dir, **overrides):
    values = dict(model=str(tiny_model_dir), data="task-api", train_examples=48, batch_size=8, max_steps=6,
                  learning_rate=5e-2, r=2,
                  # lm_head too: a random tiny model learns the answers' token distribution fast
                  target_modules=["q_proj", "v_proj", "lm_head"], eval_every=0, eval_examples=8,
                  score_examples=0, save_every=0, log_every=1, precision="fp32", run_dir=str(tmp_path / "run"),
                  name="tiny", method="adalora")
    values.update(overrides)
    return TrainConfig.from_settings(**values)


def test_adalora_run_trains_allocates_and_saves_a_peft_adapter(tmp_path, tiny_model_dir):
    config = _config(tmp_path, tiny_model_dir)
    ada = config.adapter_config(6)
    assert isinstance(ada, AdaLoraConfig)
    assert (ada.target_r, ada.init_r, ada.total_step, ada.tinit, ada.tfinal, ada.deltaT) == (2, 3, 6, 0, 1, 1)
    result = train(config, progress=False)
    losses = [m["loss"] for m in read_metrics(result.run_dir / "metrics.jsonl") if m["kind"] == "train"]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)

    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ADALORA" and saved["total_step"] == 6
    pattern = saved["rank_pattern"]
    layers = 2 * 2 + 1  # q_proj and v_proj in both layers of the tiny model, lm_head
    assert len(pattern) == layers and all(len(v) == 3 for v in pattern.values())
    assert sum(sum(v) for v in pattern.values()) == 2 * layers  # the budget fell to target_r per matrix
    assert result.summary["r"] == 2  # the summary reports the rank AdaLoRA ends at (target_r)

    ids = torch.tensor([[1, 200, 300, 400, 500]])
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), result.adapter_dir)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                            str(result.adapter_dir))
    with torch.no_grad():
        a, b = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(input_ids=ids).logits
    assert (a - b).abs().max() <= 1e-6
    assert not torch.allclose(a, base)  # it trained: E starts at 0, so the untrained adapter is a no-op


def test_adalora_refuses_other_variants_and_resume(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="method=adalora"):
        _config(tmp_path, tiny_model_dir, use_dora=True)
    with pytest.raises(ConfigError, match="method="):
        _config(tmp_path, tiny_model_dir, method="adalora2")
    from lorakit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="AdaLoRA"):
        train(_config(tmp_path, tiny_model_dir), resume=True, progress=False)
