"""A tiny, fast training configuration on the real tokenizer and the task-api data."""

import pytest

from lorakit.train import TrainConfig


@pytest.fixture
def tiny_config(tiny_model_dir, tmp_path):
    def make(**overrides):
        values = dict(model=str(tiny_model_dir), data="task-api", train_examples=48, batch_size=8,
                      max_steps=6, learning_rate=3e-2, r=4,
                      # lm_head too: a random tiny model learns the answers' token distribution fast
                      target_modules=["q_proj", "v_proj", "lm_head"], eval_every=3, eval_examples=16,
                      score_examples=4, max_new_tokens=6, save_every=2, log_every=1, precision="fp32",
                      run_dir=str(tmp_path / "run"), name="tiny")
        values.update(overrides)
        return TrainConfig.from_settings(**values)
    return make
