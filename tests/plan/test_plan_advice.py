"""The recommendation follows the lesson's selection framework and its recommendation table."""

import json
from dataclasses import fields

import pytest

from lorakit.config import PRESETS
from lorakit.errors import ConfigError
from lorakit.plan import load_shape
from lorakit.plan.advice import Recommendation, recommend
from lorakit.plan.planner import make_plan

from .tiny import SEVEN

SHAPE = load_shape("SmolLM2-135M")

# The lesson: "Very similar (just formatting) -> rank 8; Moderate changes (new domain) -> rank
# 16-32; Significant changes (new capabilities) -> rank 64+", and "<500 examples -> use lower
# rank; 500-2000 examples -> rank 16 is safe; >2000 examples -> higher rank is justified".
# Each row: (task, examples) -> the range of ranks the two questions together allow.
LESSON_TABLE = [
    ("format", 100, 4, 8), ("format", 499, 4, 8), ("format", 1000, 8, 8), ("format", 20000, 8, 8),
    ("domain", 100, 4, 15), ("domain", 1000, 16, 16), ("domain", 2000, 16, 16),
    ("domain", 2001, 16, 32), ("domain", 50000, 16, 32),
    ("behavior", 100, 8, 63), ("behavior", 1000, 16, 63), ("behavior", 5000, 64, 256),
]


@pytest.mark.parametrize("task, examples, low, high", LESSON_TABLE)
def test_the_lessons_recommendation_table_holds(task, examples, low, high):
    assert low <= recommend(task, examples, SHAPE).r <= high


@pytest.mark.parametrize("examples", [50, 800, 3000])
def test_rank_grows_with_task_complexity(examples):
    ranks = [recommend(task, examples, SHAPE).r for task in ("format", "domain", "behavior")]
    assert ranks == sorted(ranks)


@pytest.mark.parametrize("task", ["format", "domain", "behavior"])
def test_rank_grows_with_data(task):
    ranks = [recommend(task, n, SHAPE).r for n in (10, 499, 500, 2000, 2001, 100000)]
    assert ranks == sorted(ranks)


def test_the_lessons_three_patterns_are_what_it_recommends():
    # Pattern 1, "for initial experiments or small datasets"; 2, "most production use cases";
    # 3, "complex adaptations with abundant data".
    small = recommend("format", 200, SHAPE).lora_config()
    assert {k: small[k] for k in PRESETS["conservative"]} == PRESETS["conservative"]
    medium = recommend("domain", 1000, SHAPE).lora_config()
    assert {k: medium[k] for k in PRESETS["balanced"]} == PRESETS["balanced"]
    large = recommend("behavior", 10000, SHAPE)
    assert (large.r, list(large.target_modules)) == (64, SEVEN)


def test_every_choice_has_a_reason():
    rec = recommend("domain", 1000, SHAPE)
    chosen = [f.name for f in fields(Recommendation)][2:-2]  # after task/examples, before reasons
    assert set(rec.reasons) == set(chosen)
    assert all(len(why) > 10 for why in rec.reasons.values())


def test_alpha_rslora_dropout_learning_rate_and_epochs():
    low = recommend("domain", 1000, SHAPE)
    assert (low.lora_alpha, low.use_rslora, low.learning_rate) == (16, False, 2e-4)
    high = recommend("behavior", 5000, SHAPE)
    assert high.use_rslora and high.learning_rate == 1e-4
    assert high.estimate.targets[0].scale == pytest.approx(high.lora_alpha / 8)  # alpha/sqrt(64)
    assert recommend("format", 200, SHAPE).lora_dropout == 0.05
    assert recommend("format", 500, SHAPE).lora_dropout == 0.0
    assert [recommend("domain", n, SHAPE).num_epochs for n in (100, 1000, 10000)] == [3, 2, 1]


def test_targets_use_the_models_own_module_names():
    assert recommend("format", 1000, load_shape("Phi-3-mini")).target_modules == ("qkv_proj",)
    assert recommend("domain", 1000, load_shape("GPT-2")).target_modules == (
        "c_attn", "attn.c_proj", "c_fc", "mlp.c_proj")


def test_a_tight_memory_budget_turns_on_checkpointing_then_shrinks_the_batch():
    roomy = recommend("behavior", 5000, load_shape("Llama-3-8B"), 80, device="cuda", batch_size=8)
    assert (roomy.batch_size, roomy.gradient_checkpointing, roomy.estimate.memory.fits) == (8, False, True)
    tight = recommend("behavior", 5000, load_shape("Llama-3-8B"), 20, device="cuda", batch_size=8)
    assert tight.gradient_checkpointing and tight.batch_size < 8
    assert tight.batch_size * tight.gradient_accumulation_steps == 8
    assert tight.estimate.memory.fits
    assert "to fit 20 GiB" in tight.reasons["batch_size"]
    assert tight.target_modules == tuple(SEVEN)  # narrowing was not needed


def test_a_budget_below_the_frozen_weights_says_so():
    rec = recommend("domain", 1000, load_shape("Llama-3-8B"), 12, device="cuda")
    assert rec.estimate.memory.fits is False
    assert "frozen weights alone 15.0 GiB" in rec.reasons["batch_size"]
    assert rec.target_modules == tuple(SEVEN)  # narrowing would not help: keep the capacity


def test_recommend_is_a_pure_function():
    assert recommend("domain", 1234, SHAPE, 4) == recommend("domain", 1234, SHAPE, 4)


def test_bad_task_or_examples_are_reported_together():
    with pytest.raises(ConfigError) as err:
        recommend("poetry", 0, SHAPE)
    assert "task='poetry'" in str(err.value) and "examples=0" in str(err.value)
    assert recommend("behaviour", 100, SHAPE).task == "behavior"


def test_plan_shows_the_presets_beside_the_recommendation():
    plan = make_plan("SmolLM2-135M", "domain", 1000, memory_gb=2)
    assert list(plan.options) == ["recommended", "conservative", "balanced", "max_capacity"]
    assert plan.presets["max_capacity"].spec.r == 64
    assert plan.presets["conservative"].trainable_params == 460_800  # r=8 on q, v of 30 layers
    assert all(e.memory.fits is not None for e in plan.options.values())
    document = json.loads(json.dumps(plan.to_dict()))
    assert document["recommendation"]["settings"]["r"] == 16
    assert document["presets"]["balanced"]["trainable_params"] == 4_884_480



@pytest.mark.parametrize("task, examples, memory_gb", [("behavior", 5000, None), ("format", 200, None),
                                                       ("domain", 1000, 1.5)])
def test_the_train_command_it_prints_trains_the_recommended_adapter(task, examples, memory_gb):
    from lorakit.cli import build_parser
    from lorakit.plan.report import format_plan
    from lorakit.train.config import load_train_config, setting_names

    plan = make_plan(SHAPE, task, examples, memory_gb=memory_gb)
    rec = plan.recommendation
    assert "lorakit train --data YOUR.jsonl " + " ".join(rec.train_args()) in format_plan(plan)
    args = build_parser().parse_args(["train", *rec.train_args()])
    config = load_train_config(None, **{name: getattr(args, name) for name in setting_names()})
    lora = config.lora
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.use_rslora, lora.target_modules) == \
        (rec.r, rec.lora_alpha, rec.lora_dropout, rec.use_rslora, set(rec.target_modules))
    assert (config.learning_rate, config.epochs, config.batch_size, config.grad_accum,
            config.gradient_checkpointing) == (rec.learning_rate, rec.num_epochs, rec.batch_size,
                                               rec.gradient_accumulation_steps, rec.gradient_checkpointing)
