"""The LoRA variants in the trainer: LoRA+ groups under the schedule and through resume, rsLoRA,
DoRA and the initialisations reaching the adapter, the report naming the variant, validation."""

import json
import math

import peft
import pytest
import torch
import yaml
from safetensors.torch import load_file

import lorakit.train.loop as loop
import lorakit.train.setup as setup
from lorakit import PeftModel, TrainingInterrupted
from lorakit.cli import main
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.models import load_model
from lorakit.train import TrainConfig, train
from lorakit.train.config import load_train_config
from lorakit.train.schedule import lr_at
from train.test_resume import adapter_tensors, assert_bitwise_equal, signal_at_step

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning",
                                        "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def record_optimizers(monkeypatch):
    """Keep every optimizer the trainer builds (with the model it was built for)."""
    made = []
    real = setup.make_optimizer

    def make_optimizer(*args, **kwargs):
        made.append((real(*args, **kwargs), kwargs["model"]))
        return made[-1][0]

    monkeypatch.setattr(setup, "make_optimizer", make_optimizer)
    return made


def test_loraplus_groups_follow_the_schedule_at_their_ratio(tiny_config, monkeypatch):
    made = record_optimizers(monkeypatch)
    config = tiny_config(max_steps=4, loraplus_ratio=16, weight_decay=0.01, score_examples=0, save_every=0)
    result = train(config, progress=False)
    ((optimizer, model),) = made
    assert optimizer.defaults["fused"]  # still the fused AdamW
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert list(groups) == ["A", "embedding", "B", "B_no_decay"]
    names = {id(p): n for n, p in model.named_parameters()}
    members = {k: [names[id(p)] for p in g["params"]] for k, g in groups.items()}
    assert members["A"] and all(n.endswith("lora_A") for n in members["A"])
    assert members["B"] and all(n.endswith("lora_B") for n in members["B"])
    assert len(members["A"]) + len(members["B"]) == sum(p.requires_grad for p in model.parameters())
    last = lr_at(3, peak=config.learning_rate, total_steps=4, warmup=1, min_ratio=config.min_lr_ratio)
    assert groups["A"]["lr"] == pytest.approx(last)
    assert groups["B"]["lr"] == pytest.approx(16 * last)
    assert groups["A"]["weight_decay"] == groups["B"]["weight_decay"] == 0.01
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in logged if m["kind"] == "train"][-1] == pytest.approx(last)  # A's rate is logged
    assert "- Variant: LoRA+ ratio 16" in (result.run_dir / "report.md").read_text()
    assert result.summary["loraplus_ratio"] == 16 and result.summary["variant"] == "LoRA+ ratio 16"


def test_first_loraplus_step_moves_b_16x_as_far_as_a_plain_run(tiny_config, tmp_path):
    """AdamW's first step is lr * g / (|g| + eps), about lr per weight: B starts at zero, so after
    one step |B| is the learning rate of B's group, by hand."""
    common = dict(max_steps=1, learning_rate=1e-3, score_examples=0, eval_examples=2, save_every=0,
                  max_grad_norm=0.0)
    plain = adapter_tensors(train(tiny_config(run_dir=str(tmp_path / "plain"), **common), progress=False).run_dir)
    plus = adapter_tensors(train(tiny_config(run_dir=str(tmp_path / "plus"), loraplus_ratio=16, **common),
                                 progress=False).run_dir)
    lr0 = lr_at(0, peak=1e-3, total_steps=1, warmup=1)
    for key in plain:
        if ".lora_B." in key:
            assert plain[key].abs().max().item() == pytest.approx(lr0, rel=1e-3)
            assert plus[key].abs().max().item() == pytest.approx(16 * lr0, rel=1e-3)


def test_a_resumed_loraplus_run_equals_an_uninterrupted_one(tiny_config, tmp_path, monkeypatch):
    common = dict(max_steps=6, lora_dropout=0.1, save_every=0, score_examples=0, loraplus_ratio=16)
    straight = train(tiny_config(run_dir=str(tmp_path / "straight"), **common), progress=False)

    signal_at_step(monkeypatch, 2)
    with pytest.raises(TrainingInterrupted, match="step 3"):
        train(tiny_config(run_dir=str(tmp_path / "interrupted"), **common), progress=False)
    state = json.loads((tmp_path / "interrupted" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert [g["lr_scale"] for g in state["param_groups"]][2:] == [16, 16]  # the ratio is in the checkpoint
    monkeypatch.undo()
    resumed = train(tiny_config(run_dir=str(tmp_path / "interrupted"), **common), resume=True, progress=False)
    assert resumed.steps == 6
    assert_bitwise_equal(adapter_tensors(resumed.run_dir), adapter_tensors(straight.run_dir))


def test_rslora_reaches_the_saved_config_and_the_scale_in_both_libraries(tiny_config, tiny_model_dir):
    result = train(tiny_config(max_steps=1, r=4, lora_alpha=8, use_rslora=True, score_examples=0, save_every=0),
                   progress=False)
    saved = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert saved["use_rslora"] is True and saved["r"] == 4 and saved["lora_alpha"] == 8
    base, _ = load_model(str(tiny_model_dir))
    ours = PeftModel.from_pretrained(base, result.adapter_dir)
    scales = {a.scaling for m in ours.modules() if hasattr(m, "adapters") for a in m.adapters.values()}
    assert scales == {8 / math.sqrt(4)}
    base, _ = load_model(str(tiny_model_dir))
    theirs = peft.PeftModel.from_pretrained(base, str(result.adapter_dir))
    assert {s["default"] for m in theirs.modules() if isinstance(getattr(m, "scaling", None), dict)
            for s in [m.scaling]} == {8 / math.sqrt(4)}
    assert "rsLoRA" in (result.run_dir / "report.md").read_text()


def test_the_cli_takes_the_variant_flags_and_prints_the_variant(tiny_config, tmp_path, capsys):
    base = {k: v for k, v in tiny_config(score_examples=0, max_steps=1, save_every=0).to_dict().items()
            if k != "extra"}
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(base))
    run_dir = tmp_path / "cli-run"
    code = main(["train", "--config", str(config_file), "--run-dir", str(run_dir), "--no-progress",
                 "--loraplus-ratio", "16", "--use-rslora", "--init-lora-weights", "gaussian"])
    assert code == 0
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["loraplus_ratio"], saved["lora"]["use_rslora"], saved["lora"]["init_lora_weights"]) == \
        (16.0, True, "gaussian")
    assert "variant: rsLoRA, init gaussian, LoRA+ ratio 16" in capsys.readouterr().out
    adapter = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter["init_lora_weights"] == "gaussian" and adapter["use_rslora"] is True


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("True", True), ("gaussian", "gaussian"),
                                         ("pissa", "pissa"), ("pissa_niter_4", "pissa_niter_4"), ("olora", "olora")])
def test_init_lora_weights_from_the_command_line_or_yaml(text, value, tmp_path):
    assert TrainConfig.from_settings(init_lora_weights=text).lora.init_lora_weights == value
    config_file = tmp_path / "c.yaml"
    config_file.write_text(f"init_lora_weights: {text}\n")
    assert load_train_config(config_file).lora.init_lora_weights == value


def test_bad_variant_values_are_reported_together_with_the_fix():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_settings(init_lora_weights="pisa", loraplus_ratio=0, use_dora="yes")
    message = str(err.value)  # the adapter's problems are LoraConfig's own, the run's beside them
    assert "init_lora_weights='pisa': lorakit supports True (PEFT's default), 'gaussian', 'pissa', " \
           "'pissa_niter_<N>', 'olora' or False" in message
    assert "loraplus_ratio=0: must be a positive number" in message
    assert "use_dora='yes': must be True (DoRA) or False (plain LoRA)" in message
    for bad in (-1.0, float("nan"), "16"):
        with pytest.raises(ConfigError, match="loraplus_ratio"):
            TrainConfig.from_settings(loraplus_ratio=bad)
    with pytest.raises(ConfigError, match="pissa_niter_<N>' with N a non-negative integer"):
        TrainConfig.from_settings(init_lora_weights="pissa_niter_x")


@pytest.mark.parametrize("init", ["pissa_niter_0", "OLoRA", "Gaussian"])
def test_the_trainer_takes_every_init_the_lora_config_takes(init):
    """One rule, LoraConfig's (PEFT 0.21 runs pissa_niter_0 as a randomized SVD without power
    iterations, and compares "olora" and "gaussian" in lower case)."""
    assert TrainConfig.from_settings(init_lora_weights=init).lora.init_lora_weights == init
    assert TrainConfig(lora=LoraConfig(init_lora_weights=init)).lora.init_lora_weights == init


def test_a_train_config_holds_the_lora_config_and_reads_flat_settings_and_its_own_yaml(tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    config = TrainConfig(lora=lora, max_steps=3)
    assert config.lora is lora and config.adapter_config(3).base_model_name_or_path == config.model
    path = tmp_path / "config.yaml"
    config.save(path)
    again = load_train_config(path)
    assert again.lora == lora and again.max_steps == 3  # every adapter field, nested under lora:
    assert load_train_config(path, r=16).lora.lora_alpha == 16  # a flag r without alpha: alpha = r
    flat = TrainConfig.from_settings(preset="conservative", r=4)
    assert (flat.lora.r, flat.lora.lora_alpha, flat.lora.lora_dropout, flat.lora.target_modules) == \
        (4, 4, 0.05, {"q_proj", "v_proj"})
    old = tmp_path / "old.yaml"  # a config.yaml of the flat layout
    old.write_text("r: 4\nlora_alpha: null\ntarget_modules: [q_proj]\nuse_dora: true\npreset: balanced\nmax_steps: 2\n")
    assert (load_train_config(old).lora.r, load_train_config(old).lora.use_dora) == (4, True)
    with pytest.raises(ConfigError, match="must be a LoraConfig"):
        TrainConfig(lora={"r": 4})


def test_the_variant_fields_reach_the_lora_config():
    config = TrainConfig.from_settings(use_rslora=True, init_lora_weights=False)
    lora = config.lora
    assert lora.use_rslora is True and lora.init_lora_weights is False and lora.use_dora is False


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_both(tiny_model_dir, adapter_dir):
    """The adapter on a fresh, unmodified base model, in lorakit and in PEFT."""
    ours = PeftModel.from_pretrained(load_model(str(tiny_model_dir))[0], adapter_dir).eval()
    theirs = peft.PeftModel.from_pretrained(load_model(str(tiny_model_dir))[0], str(adapter_dir)).eval()
    return ours, theirs


IDS = torch.tensor([[1, 520, 3300, 42, 977, 12, 2]])


def test_a_dora_run_trains_and_its_adapter_loads_back_in_both_libraries(tiny_config, tiny_model_dir, monkeypatch):
    made = record_optimizers(monkeypatch)
    # not lm_head: its padding row is zero, and DoRA divides by each row's norm (NaN, in PEFT too)
    result = train(tiny_config(max_steps=3, use_dora=True, score_examples=0, save_every=0,
                               target_modules=["q_proj", "v_proj"]), progress=False)
    trained = made[0][1].eval()
    saved = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    magnitudes = [k for k in saved if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == 4  # q_proj, v_proj in 2 layers
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["use_dora"] is True
    assert result.summary["heldout_after"] < result.summary["heldout_before"]  # it trained
    ours, theirs = load_both(tiny_model_dir, result.adapter_dir)
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs(ours, IDS), outputs(trained, IDS), rtol=0, atol=1e-4)
    assert "- Variant: DoRA" in (result.run_dir / "report.md").read_text()


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_pissa_or_olora_run_saves_an_adapter_for_the_original_base(init, tiny_config, tiny_model_dir, monkeypatch,
                                                                      tmp_path):
    made = record_optimizers(monkeypatch)
    # not lm_head: it shares its weight with the embedding here, and the residual would change both
    common = dict(max_steps=3, score_examples=0, save_every=0, target_modules=["q_proj", "v_proj"])
    plain = train(tiny_config(run_dir=str(tmp_path / "plain"), **common), progress=False)
    result = train(tiny_config(run_dir=str(tmp_path / init), init_lora_weights=init, **common), progress=False)
    trained = made[-1][1].eval()
    # the fresh adapter over the residual is the untuned model
    assert result.summary["heldout_before"] == pytest.approx(plain.summary["heldout_before"], abs=1e-4)
    assert result.summary["heldout_after"] < result.summary["heldout_before"]
    assert (result.run_dir / "initial_adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"]) == (True, 8, 8)  # rank 2r, same scale
    ours, theirs = load_both(tiny_model_dir, result.adapter_dir)  # onto the unmodified base
    torch.testing.assert_close(outputs(ours, IDS), outputs(theirs, IDS), rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs(ours, IDS), outputs(trained, IDS), rtol=0, atol=1e-4)
    report = (result.run_dir / "report.md").read_text()
    assert f"init {init}" in report and "plain LoRA adapter of rank 8 for the original base model" in report


def test_the_planner_reports_rslora_and_its_settings_feed_the_trainer(capsys):
    args = ["plan", "--model", "Llama-3-8B", "--task", "behavior", "--examples", "5000"]
    assert main(args + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)["recommendation"]
    settings = rec["settings"]
    assert (settings["r"], settings["lora_alpha"], settings["use_rslora"]) == (64, 16, True)
    assert "rsLoRA" in rec["reasons"]["use_rslora"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "use_rslora          on" in text and "64 / 16 rs" in text
    # what the plan advises is what `lorakit train --r 64 --lora-alpha 16 --use-rslora` trains
    config = load_train_config(None, r=settings["r"], lora_alpha=settings["lora_alpha"],
                               use_rslora=settings["use_rslora"])
    lora = config.lora
    assert (lora.r, lora.lora_alpha, lora.use_rslora) == (64, 16, True)
