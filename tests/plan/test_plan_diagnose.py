"""Each verdict of `diagnose` for a metrics file made to show it, a real short run that overfits on
purpose, and the metrics reader's rules."""

import json
import math
import random

import pytest

from lorakit.errors import DataError
from lorakit.plan.diagnosis import diagnose
from lorakit.plan.metrics import read_metrics
from lorakit.plan.plot import plot_diagnosis


def write_run(run, losses, evals=(), lr=2e-4, grad_norms=None, steps_per_epoch=100, adapter=None):
    """A run directory whose metrics.jsonl logs ``losses`` every 5 steps and ``evals``
    ((step, loss) pairs), as the trainer writes it."""
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, loss in enumerate(losses):
        step = 5 * (i + 1)
        grad = grad_norms[i] if grad_norms else 1.0
        lines.append(json.dumps({"kind": "train", "step": step, "epoch": step / steps_per_epoch,
                                 "loss": loss, "lr": lr, "grad_norm": grad, "tokens": 2048 * step,
                                 "elapsed_s": 0.5 * step}))
    for step, loss in evals:
        lines.append(json.dumps({"kind": "eval", "step": step, "eval_loss": loss}))
    lines.append(json.dumps({"kind": "score", "step": 600, "exact_match": 0.9}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text(json.dumps(adapter))
    return run


def noisy(values, scale=0.02, seed=0):
    rng = random.Random(seed)
    return [v * (1 + rng.uniform(-scale, scale)) for v in values]


def decay(n, start, floor, rate):
    return [floor + (start - floor) * math.exp(-rate * i) for i in range(n)]


def test_healthy(tmp_path):
    run = write_run(tmp_path, noisy(decay(120, 2.5, 0.3, 0.04)),
                    evals=[(100, 1.2), (200, 0.7), (400, 0.45), (600, 0.42)])
    d = diagnose(run)
    assert d.verdict == "healthy"
    assert "2." in d.evidence[0] and "-> 0.3" in d.evidence[0]
    assert d.marker_step == 600


def test_overfitting(tmp_path):
    train = noisy(decay(120, 2.5, 0.05, 0.04))
    evals = [(100, 1.3), (200, 0.8), (300, 0.7), (400, 0.78), (500, 0.9), (600, 1.05)]
    run = write_run(tmp_path, train, evals=evals,
                    adapter={"r": 32, "lora_alpha": 32, "lora_dropout": 0.0})
    d = diagnose(run)
    assert d.verdict == "overfitting"
    assert d.marker_step == 300
    assert "lowest, 0.700, at step 300 (epoch 3.00)" in d.evidence[0]
    assert "1.050 at step 600 (+50.0%)" in d.evidence[0]
    changes = " | ".join(d.changes)
    assert "stop at step 300" in changes and "more (and more varied) training examples" in changes
    # Lower rank and more dropout are not advised: no real run here shows that they help.
    assert "r=32" not in changes and "dropout" not in changes
    assert d.confidence == "high" and "+50.0% above its best" not in d.confidence_reason


def test_not_learning(tmp_path):
    run = write_run(tmp_path, noisy([2.31] * 80, 0.01), lr=1e-6, adapter={"r": 8, "lora_alpha": 8})
    d = diagnose(run)
    assert d.verdict == "not_learning"
    changes = " | ".join(d.changes)
    assert "raise the learning rate (peak 1e-06) to 0.0002" in changes and "labels" in changes
    assert "training loss fell" in d.confidence_reason  # no held-out loss before training


def test_not_learning_is_decided_by_the_held_out_loss_when_it_was_measured_before_training(tmp_path):
    # Training loss falls 10% (noise on a few batches can do that); held-out loss from before
    # training (step 0) to the end falls 1%: the run did not learn.
    run = write_run(tmp_path, noisy(decay(40, 3.2, 2.9, 0.2), 0.01), evals=[(0, 3.0), (200, 2.97)],
                    adapter={"r": 8, "lora_alpha": 8})
    d = diagnose(run)
    assert d.verdict == "not_learning" and "held-out loss 3.000 at step 0 -> 2.970" in d.evidence[1]
    assert "r=8 -> 16" in " | ".join(d.changes)  # the usual rate: a larger adapter is the test


@pytest.mark.parametrize("bad", [None, float("nan"), float("inf")])
def test_diverging_on_non_finite_loss(tmp_path, bad):
    losses = decay(60, 2.5, 0.8, 0.05) + [bad] * 10
    d = diagnose(write_run(tmp_path, losses))
    assert d.verdict == "diverging"
    assert d.marker_step == 305 and "NaN or Inf at step 305 (10 of 70" in d.evidence[0]
    assert any("lower the learning rate (peak 2e-04)" in c for c in d.changes)
    assert any("warm-up" in c for c in d.changes) and any("clip" in c for c in d.changes)


def test_diverging_on_a_spike_and_on_a_nan_gradient(tmp_path):
    losses = noisy(decay(80, 2.5, 0.6, 0.05))
    losses[50] = 4.0
    d = diagnose(write_run(tmp_path / "spike", losses))
    assert d.verdict == "diverging" and d.marker_step == 255 and "spiked to 4.000" in d.evidence[0]
    grads = [1.0] * 80
    grads[70] = float("nan")
    d = diagnose(write_run(tmp_path / "grad", noisy(decay(80, 2.5, 0.6, 0.05)), grad_norms=grads))
    assert d.verdict == "diverging" and "gradient norm" in d.evidence[0]


def test_underfitting(tmp_path):
    run = write_run(tmp_path, noisy(decay(120, 3.0, 1.8, 0.15), 0.01),
                    evals=[(200, 1.9), (400, 1.87), (600, 1.86)],
                    adapter={"r": 8, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    d = diagnose(run)
    assert d.verdict == "underfitting"
    changes = " | ".join(d.changes)
    assert "r=8 -> 16" in changes and "gate_proj, up_proj, down_proj" in changes
    assert "held-out loss 1.860 at step 600" in d.evidence[1]


def test_the_same_plateau_low_is_healthy(tmp_path):
    run = write_run(tmp_path, noisy(decay(120, 3.0, 0.2, 0.15), 0.01),
                    evals=[(200, 0.3), (400, 0.26), (600, 0.25)])
    assert diagnose(run).verdict == "healthy"
    assert diagnose(run, high_loss=0.1).verdict == "underfitting"


def test_too_few_points_is_inconclusive(tmp_path):
    assert diagnose(write_run(tmp_path, [2.0, 1.9, 1.8])).verdict == "inconclusive"


def test_plot_marks_the_verdict(tmp_path):
    run = write_run(tmp_path, noisy(decay(120, 2.5, 0.05, 0.04)),
                    evals=[(100, 1.3), (200, 0.8), (300, 0.7), (500, 0.9), (600, 1.05)])
    path = plot_diagnosis(diagnose(run), tmp_path / "diagnosis.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))


def test_reader_tolerates_unknown_keys_and_kinds_and_takes_the_resumed_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join([
        '{"kind": "train", "step": 1, "loss": 2.0, "new_field": [1, 2]}',
        '{"kind": "train", "step": 2, "loss": null, "lr": NaN}',
        '',
        '{"kind": "score", "step": 2, "exact": 0.5}',
        '{"kind": "train", "step": 2, "loss": 1.5}',
        '{"kind": "eval", "step": 2, "eval_loss": 1.7}',
    ]))
    m = read_metrics(path)
    assert [(p.step, p.loss) for p in m.train] == [(1, 2.0), (2, 1.5)]
    assert m.evals[0].eval_loss == 1.7 and (m.skipped, m.replaced) == (1, 1)


@pytest.mark.parametrize("line, message", [
    ('{"kind": "train", "step": 1, "loss": 2.0', "line 2: not JSON"),
    ('[1, 2]', "line 2: expected an object"),
    ('{"kind": "train", "step": "3", "loss": 1.0}', "line 2: 'step' must be an integer"),
    ('{"kind": "train", "step": 3}', "line 2: missing 'loss'"),
    ('{"kind": "eval", "step": 3, "eval_loss": "low"}', "line 2: 'eval_loss' must be a number"),
])
def test_a_malformed_line_is_a_data_error_naming_it(tmp_path, line, message):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 0, "loss": 2.0}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_metrics(path)


def test_missing_metrics_say_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="run directory"):
        diagnose(tmp_path)


def test_one_high_last_point_on_a_noisy_plateau_is_not_overfitting(tmp_path):
    # The held-out loss levels off around 0.5 (+-4%); its last point happens to be 5.7% above
    # the lowest one, but the last three average only 3.9% above it.
    evals = [(100, 1.2), (200, 0.7), (300, 0.52), (400, 0.49), (500, 0.51), (600, 0.50),
             (700, 0.518)]
    run = write_run(tmp_path, noisy(decay(140, 2.5, 0.3, 0.04)), evals=evals)
    assert diagnose(run).verdict == "healthy"


def test_a_real_run_that_overfits_on_purpose(tiny_model_dir, tmp_path):
    """A tiny random Llama memorises 4 task-api examples for 40 epochs (LoRA on q, v and the
    output head, lr 1e-2): its training loss keeps falling, its held-out loss turns up after
    about 12 steps. (At 2e-2 and above the loss of this model also spikes now and then.)"""
    from lorakit.train import TrainConfig, train

    config = TrainConfig.from_settings(model=str(tiny_model_dir), data="task-api", train_examples=4,
                                       batch_size=4, max_steps=40, learning_rate=1e-2, r=16,
                                       target_modules=["q_proj", "v_proj", "lm_head"], eval_every=4,
                                       eval_examples=16, score_examples=2, max_new_tokens=4, save_every=0,
                                       log_every=1, precision="fp32", run_dir=str(tmp_path / "run"))
    result = train(config, progress=False)

    metrics = read_metrics(result.run_dir)  # what the trainer logs is what the reader reads
    assert [p.step for p in metrics.train] == list(range(1, 41))
    assert all(None not in (p.epoch, p.lr, p.grad_norm, p.tokens, p.elapsed_s)
               for p in metrics.train)
    assert [e.step for e in metrics.evals] == list(range(0, 41, 4))
    assert metrics.skipped == 2  # the task score before and after

    d = diagnose(result.run_dir)
    assert d.verdict == "overfitting", (d.summary, d.evidence)
    best = min(metrics.evals, key=lambda e: e.eval_loss)
    assert d.marker_step == best.step < 40
    assert f"lowest, {best.eval_loss:.3f}, at step {best.step} (epoch {best.step:.2f})" \
        in d.evidence[0]
    assert "training loss kept falling" in d.evidence[1]
    changes = " | ".join(d.changes)
    assert f"stop at step {best.step}" in changes and "more" in changes
    assert "r=16" not in changes  # a lower rank is not advised: no real run shows it helps


def test_a_wobble_of_a_converged_near_zero_loss_is_not_a_spike(tmp_path):
    # The full demo's shape: 3.0 down to about 0.0014, then one log of 0.006 (4.2x the median
    # before it, but 0.15% of the starting loss): healthy. The same jump from 0.6 to 4.0 is not.
    losses = noisy(decay(250, 3.0, 0.0014, 0.08), 0.05)
    losses[200] = 0.006
    run = write_run(tmp_path / "demo", losses, evals=[(0, 3.0), (500, 0.01), (1000, 0.002), (1250, 0.0018)])
    d = diagnose(run)
    assert d.verdict == "healthy" and d.confidence == "high", (d.evidence, d.confidence_reason)
    losses[200] = 4.0
    assert diagnose(write_run(tmp_path / "spike", losses)).verdict == "diverging"
