"""`diagnose` on real runs of the default model (tests/plan/fixtures/real_runs/, each made by the
command in that folder's README): every run gets its verdict, the healthy ones are called healthy,
and each change the advice makes to a hyperparameter helps when the run is made again with it."""

from pathlib import Path

import pytest
import yaml

from lorakit.plan.diagnosis import CONFIDENCES, diagnose
from lorakit.plan.report import format_diagnosis

RUNS = Path(__file__).parent / "fixtures" / "real_runs"

# fixture -> (verdict, a phrase its advice must contain)
EXPECTED = {
    "demo-full": ("healthy", "none needed"),
    "demo-60-steps": ("healthy", "none needed"),
    "24-examples-20-epochs": ("healthy", "none needed"),
    "diverging-lr-2e-2": ("diverging", "lower the learning rate (peak 2e-02) by 10x, to 2e-03"),
    "diverging-rerun-lr-2e-3": ("healthy", "none needed"),
    "not-learning-lr-1e-7": ("not_learning", "raise the learning rate (peak 1e-07) to 0.0002"),
    "not-learning-rerun-lr-2e-4": ("healthy", "none needed"),
    "small-adapter-r1-q-proj": ("not_learning", "r=1 -> 2 and the MLP projections"),
    "overfitting-8-examples-30-epochs": ("overfitting", "stop at step 16 (epoch 8.00)"),
    "small-adapter-rerun-r2-mlp": ("healthy", "none needed"),
    "rank-1-q-proj-150-steps": ("healthy", "none needed"),
    "rank-16-q-proj-150-steps": ("healthy", "none needed"),
    "rank-2-mlp-150-steps": ("healthy", "none needed"),
}

# run -> (the rerun that follows its advice, the settings the rerun changed, as the advice says)
RERUNS = {
    "diverging-lr-2e-2": ("diverging-rerun-lr-2e-3", {"learning_rate": "2e-03"}),
    "not-learning-lr-1e-7": ("not-learning-rerun-lr-2e-4", {"learning_rate": "0.0002"}),
    "small-adapter-r1-q-proj": ("small-adapter-rerun-r2-mlp",
                                {"r": "r=1 -> 2", "target_modules": "gate_proj, up_proj, down_proj"}),
}

def config(name: str) -> dict:
    return yaml.safe_load((RUNS / name / "config.yaml").read_text())


def test_every_fixture_is_listed_and_documented():
    assert sorted(p.name for p in RUNS.iterdir() if p.is_dir()) == sorted(EXPECTED)
    readme = (RUNS / "README.md").read_text()
    for name, (verdict, _) in EXPECTED.items():
        assert f"`{name}`" in readme and verdict.replace("_", " ") in readme, name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_real_run_gets_its_verdict(name):
    verdict, advice = EXPECTED[name]
    d = diagnose(RUNS / name)
    assert d.verdict == verdict, (name, d.summary, d.evidence, d.confidence_reason)
    assert any(advice in c for c in d.changes), (name, d.changes)
    assert d.confidence in CONFIDENCES and d.confidence_reason
    text = format_diagnosis(d)
    assert f"Confidence {d.confidence}: " in text and d.evidence[0] in text


def test_the_whole_demo_is_healthy_though_its_last_loss_is_4x_the_steps_before():
    """`make demo` (250 steps): its training loss ends 0.0013 -> 0.0061 in the last log, several
    times the median of the steps before but a fraction of a percent of the starting loss."""
    d = diagnose(RUNS / "demo-full")
    assert d.metrics.train[-1].loss > 3 * d.metrics.train[-2].loss
    assert d.verdict == "healthy" and d.confidence == "high"
    assert "no NaN, no loss spikes" in d.evidence


def test_a_converged_near_zero_loss_is_no_spike():
    """The demo's held-out loss ends near 0.07; its training loss wobbles 0.08 -> 0.11 between
    logs, well over 1x its neighbours at times but a few percent of the starting loss 3.0."""
    d = diagnose(RUNS / "demo-60-steps")
    assert d.verdict == "healthy" and d.confidence == "high"
    assert "no NaN, no loss spikes" in d.evidence


def test_a_spike_is_measured_against_the_starting_loss():
    d = diagnose(RUNS / "diverging-lr-2e-2")
    assert "the loss spiked to 23.426 at step 9" in d.evidence[0]
    assert "of the starting loss" in d.evidence[0] and d.confidence == "high"
    assert d.marker_step == 9


def test_overfitting_marks_the_best_step_and_the_rise():
    d = diagnose(RUNS / "overfitting-8-examples-30-epochs")
    assert d.marker_step == 16 and d.confidence == "high"
    assert "lowest, 0.300, at step 16 (epoch 8.00), then rose to 0.520 at step 60" in d.evidence[0]
    assert "add more (and more varied) training examples" in d.changes  # 24-examples-20-epochs


def test_a_rank_1_adapter_is_slower_not_stuck():
    """The search for an underfitting run: at lr 1e-3 and 150 steps, r=1 on q_proj alone learns
    task-api (held-out 3.00 -> 0.40) without levelling off, so it is healthy; r=16 on q_proj (0.10)
    or r=2 with the MLP projections (0.09) get further in the same steps. Rank changes the pace
    here, not whether the run learns, and none of the three is a plateau to call underfitting."""
    ends = {}
    for name in ("rank-1-q-proj-150-steps", "rank-16-q-proj-150-steps", "rank-2-mlp-150-steps"):
        d = diagnose(RUNS / name)
        assert d.verdict == "healthy"
        ends[name] = d.metrics.evals[-1].eval_loss
    assert ends["rank-1-q-proj-150-steps"] < 0.5
    assert ends["rank-16-q-proj-150-steps"] < 0.5 * ends["rank-1-q-proj-150-steps"]
    assert ends["rank-2-mlp-150-steps"] < 0.5 * ends["rank-1-q-proj-150-steps"]


@pytest.mark.parametrize("run", sorted(RERUNS))
def test_the_advised_change_helps_when_the_run_is_made_again(run):
    rerun, advised = RERUNS[run]
    before, after = diagnose(RUNS / run), diagnose(RUNS / rerun)
    old, new = config(run), config(rerun)
    changed = {k for k in old if k not in ("name", "run_dir") and old[k] != new[k]}
    assert changed == set(advised)  # the rerun differs in the advised settings only
    changes = " | ".join(before.changes)
    assert all(text in changes for text in advised.values()), (advised, changes)
    assert after.verdict == "healthy"
    # the held-out loss at the same step is far lower (a run that learns, against one that
    # did not or that blew up)
    at = {e.step: e.eval_loss for e in before.metrics.evals}
    step = max(e.step for e in after.metrics.evals if e.step in at)
    after_loss = next(e.eval_loss for e in after.metrics.evals if e.step == step)
    assert after_loss < 0.75 * at[step], (step, after_loss, at[step])
