"""The real embedded model, end to end: loads from the package, trains two steps, generates."""

import pytest

from lorakit.infer import complete, load_adapted
from lorakit.train import TrainConfig, train

pytestmark = pytest.mark.slow


def test_default_model_trains_two_steps_and_generates(default_model_dir, tmp_path):
    config = TrainConfig(train_examples=16, batch_size=4, max_steps=2, learning_rate=1e-3, eval_examples=8,
                         eval_every=0, score_examples=4, max_new_tokens=24, save_every=0,
                         run_dir=str(tmp_path / "run"), name="default-smoke")
    result = train(config, progress=False)
    assert result.steps == 2 and result.summary["trainable"] == 4_884_480
    assert result.summary["heldout_after"] < result.summary["heldout_before"]
    model, tokenizer = load_adapted(result.adapter_dir)
    answer = complete(model, tokenizer, ["remind me to water the plants tomorrow"],
                      system="Turn the request into task JSON.", max_new_tokens=24)[0]
    assert isinstance(answer, str) and answer.strip()
