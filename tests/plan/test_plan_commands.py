"""`lorakit plan / inspect / diagnose`: each a library call and printing."""

import argparse
import json

import pytest

import lorakit.cli
from lorakit.plan.commands import register

from .test_plan_diagnose import decay, noisy, write_run
from .test_plan_inspect import save_adapter


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lorakit")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_plan_prints_the_table_for_the_default_model(capsys):
    assert run(["plan", "--task", "domain", "--examples", "1000", "--memory-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "SmolLM2-135M-Instruct" in out and "Recommendation" in out
    for column in ("recommended", "conservative", "balanced", "max_capacity"):
        assert column in out
    assert "fits in 8 GiB" in out
    assert "trainable params: 4,884,480 || all params: 139,399,488 || trainable%: 3.5039" in out


def test_plan_json_is_the_same_plan(capsys):
    argv = ["plan", "--model", "Llama-3-8B", "--task", "format", "--examples", "300",
            "--device", "cuda", "--seq-len", "1024", "--batch-size", "2", "--json"]
    assert run(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["model"]["params"] == 8_030_261_248
    rec = doc["recommendation"]
    assert rec["settings"]["r"] == 8 and rec["settings"]["target_modules"] == ["q_proj", "v_proj"]
    assert rec["estimate"]["trainable_params"] == 3_407_872
    memory = rec["estimate"]["memory"]
    assert memory["seq_len"] == 1024 and memory["device"] == "cuda"
    assert sum(memory[k] for k in ("weights", "adapter", "activations", "logits", "allocator",
                                 "overhead")) \
        == memory["total"]
    assert set(doc["presets"]) == {"conservative", "balanced", "max_capacity"}


def test_inspect_prints_and_jsons(tmp_path, capsys):
    save_adapter(tmp_path)
    assert run(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "r=4, lora_alpha=8" in out and "layer   1" in out and "changed most" in out
    assert run(["inspect", str(tmp_path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["modules"]) == 14


def test_diagnose_prints_the_verdict_and_draws_the_plot(tmp_path, capsys):
    write_run(tmp_path, noisy(decay(120, 2.5, 0.05, 0.04)),
              evals=[(100, 1.3), (200, 0.8), (300, 0.7), (500, 0.9), (600, 1.05)])
    assert run(["diagnose", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OVERFITTING" in out and "stop at step 300" in out
    assert "Confidence high: held-out loss +" in out
    assert (tmp_path / "diagnosis.png").stat().st_size > 0
    assert run(["diagnose", str(tmp_path / "metrics.jsonl"), "--no-plot", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["verdict"] == "overfitting" and doc["plot"] is None
    assert doc["confidence"] == "high" and "above its best" in doc["confidence_reason"]


def test_bad_input_is_one_line_and_exit_2_through_lorakit_main(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", ("lorakit.plan.commands",))
    assert lorakit.cli.main(["plan", "--model", "Llama-9-1T", "--task", "domain",
                             "--examples", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model 'Llama-9-1T'") and err.count("\n") == 1
    assert lorakit.cli.main(["diagnose", str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert lorakit.cli.main(["inspect", str(tmp_path)]) == 2


def test_help_text_comes_from_the_docstrings(capsys):
    with pytest.raises(SystemExit):
        run(["diagnose", "--help"])
    assert "not learning" in capsys.readouterr().out


def test_plan_json_per_device_on_two_gpus_with_fsdp(capsys):
    argv = ["plan", "--model", "Llama-3-8B", "--task", "format", "--examples", "300", "--device", "cuda",
            "--memory-gb", "14", "--gpus", "2", "--strategy", "fsdp", "--json"]
    assert run(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    memory = doc["recommendation"]["estimate"]["memory"]
    assert (memory["gpus"], memory["strategy"]) == (2, "fsdp")
    assert memory["weights"] == 8_030_261_248 * 2 // 2  # bf16 frozen weights, sharded in two
    assert sum(memory[k] for k in ("weights", "adapter", "activations", "logits", "allocator",
                                 "overhead", "distributed")) == memory["total"]
    assert memory["fits"] is True and doc["presets"]["balanced"]["memory"]["gpus"] == 2
    strategy = doc["strategy"]
    assert strategy["suggested"] == "fsdp" and "frozen weights alone" in strategy["reason"]
    assert strategy["per_device"]["ddp"]["weights"] == 8_030_261_248 * 2
    assert strategy["per_device"]["ddp"]["fits"] is False
    assert doc["recommendation"]["train_args"][-4:] == ["--nproc", "2", "--strategy", "fsdp"]


def test_bad_gpus_or_strategy_exit_2_through_lorakit_main(monkeypatch, capsys):
    monkeypatch.setattr(lorakit.cli, "COMMAND_MODULES", ("lorakit.plan.commands",))
    assert lorakit.cli.main(["plan", "--task", "domain", "--examples", "10", "--gpus", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot estimate memory: gpus=0: must be a positive number") \
        and err.count("\n") == 1
    with pytest.raises(SystemExit) as exit_:
        lorakit.cli.main(["plan", "--task", "domain", "--examples", "10", "--strategy", "xyz"])
    assert exit_.value.code == 2
    assert "invalid choice: 'xyz' (choose from 'ddp', 'fsdp')" in capsys.readouterr().err
