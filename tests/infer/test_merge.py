"""`merge_adapter` and `lorakit merge`: the merged directory loads in plain transformers and gives
the adapted model's outputs; the rounding report against hand computations."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lorakit import PeftModel
from lorakit.cli import main
from lorakit.errors import ConfigError
from lorakit.infer.merge import RoundingReport, merge_adapter, rounding_loss
from lorakit.models import load_model

from .conftest import make_adapter

IDS = torch.tensor([[1, 520, 3000, 17, 49151, 2, 42, 9]])


def adapted_logits(model_dir, adapter_dir):
    base, _ = load_model(model_dir)
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir)(input_ids=IDS).logits


def plain_logits(out_dir, dtype=torch.float32):
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float(), model


# -- the measure, by hand --------------------------------------------------------------------

def test_an_update_below_half_an_ulp_is_entirely_lost_in_bf16():
    # bf16 has 8 significant bits: around 1.0 the spacing is 2**-7, half of it 2**-8
    base = torch.ones(4, 4)
    loss = rounding_loss("w", base, base + 2 ** -10, torch.bfloat16)
    assert (loss.changed, loss.lost) == (16, 16)
    assert loss.relative_error == 1.0 and loss.lost_fraction == 1.0
    # exactly half an ulp rounds to the even neighbour, 1.0: lost too
    assert rounding_loss("w", base, base + 2 ** -8, torch.bfloat16).lost == 16
    # a representable update (two ulps) survives whole
    kept = rounding_loss("w", base, base + 2 ** -6, torch.bfloat16)
    assert (kept.lost, kept.relative_error) == (0, 0.0)


def test_a_half_lost_update_by_hand_and_fp16_keeps_what_bf16_loses():
    base = torch.ones(16)
    update = torch.cat([torch.full((8,), 2.0 ** -10), torch.full((8,), 2.0 ** -6)])
    loss = rounding_loss("w", base, base + update, torch.bfloat16)
    # error: the eight 2**-10 elements; update: all sixteen
    expected = math.sqrt(8 * 2.0 ** -20) / math.sqrt(8 * 2.0 ** -20 + 8 * 2.0 ** -12)
    assert loss.lost == 8 and loss.lost_fraction == 0.5
    assert loss.relative_error == pytest.approx(expected, rel=1e-6)
    # fp16 (11 significant bits): 2**-10 is one ulp at 1.0, kept; 2**-12 is under half an ulp, lost
    assert rounding_loss("w", base, base + update, torch.float16).lost == 0
    assert rounding_loss("w", base, base + 2.0 ** -12, torch.float16).lost_fraction == 1.0
    # untouched elements are not counted as lost
    assert rounding_loss("w", base, base, torch.bfloat16).changed == 0


def test_the_pooled_totals_weigh_layers_by_their_update():
    base = torch.ones(8)
    lost = rounding_loss("a", base, base + 2.0 ** -10, torch.bfloat16)  # error 1 * ||dW_a||
    kept = rounding_loss("b", base, base + 2.0 ** -6, torch.bfloat16)  # error 0
    report = RoundingReport("bf16", [lost, kept])
    expected = lost.update_norm / math.hypot(lost.update_norm, kept.update_norm)
    assert report.relative_error == pytest.approx(expected)
    assert report.lost_fraction == 0.5
    assert report.worst(1)[0].name == "a"
    assert "WARNING" in report.summary()
    assert RoundingReport("bf16", [kept]).warning() is None


# -- merged directories ----------------------------------------------------------------------

def test_an_fp32_merge_loads_in_transformers_with_the_adapted_outputs(tiny_model_dir, tiny_adapter, tmp_path):
    out = tmp_path / "merged"
    report = merge_adapter(tiny_adapter, out, dtype="fp32")
    assert report.rounding is None and report.dtype == "fp32"
    assert report.merged_layers == 5  # q_proj and v_proj in two layers, and lm_head
    assert report.untied == ["lm_head"]  # tied to the input embeddings, which the adapter does not change
    names = sorted(p.name for p in out.iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(names)
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

    logits, model = plain_logits(out)
    assert torch.allclose(logits, adapted_logits(tiny_model_dir, tiny_adapter), atol=1e-5, rtol=0)
    assert model.config.tie_word_embeddings is False
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights)
    base, _ = load_model(tiny_model_dir)  # the input embeddings are the base's, untouched
    assert torch.equal(weights["model.embed_tokens.weight"], base.model.embed_tokens.weight)


def test_a_bf16_merge_stores_the_rounded_fp32_merge_and_reports_it(tiny_model_dir, tiny_adapter, tmp_path):
    out = tmp_path / "merged-bf16"
    report = merge_adapter(tiny_adapter, out, dtype="bf16")
    assert report.dtype == "bf16" and len(report.rounding.layers) == 5
    logits, model = plain_logits(out, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"

    # the stored q_proj is round(W + dW) of the fp32 merge
    fp32 = tmp_path / "merged-fp32"
    merge_adapter(tiny_adapter, fp32, dtype="fp32")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(load_file(out / "model.safetensors")[key],
                       load_file(fp32 / "model.safetensors")[key].to(torch.bfloat16))
    reference = adapted_logits(tiny_model_dir, tiny_adapter)
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()


def test_a_tiny_update_is_reported_lost_in_bf16(tiny_model_dir, tmp_path):
    adapter = make_adapter(tiny_model_dir, tmp_path / "tiny-update", b_scale=1e-6)
    report = merge_adapter(adapter, tmp_path / "merged", dtype="bf16")
    assert report.rounding.lost_fraction > 0.9 and report.rounding.relative_error > 0.5
    assert "WARNING" in report.summary() and "--dtype fp32" in report.summary()
    strong = make_adapter(tiny_model_dir, tmp_path / "strong-update", b_scale=100.0)
    assert merge_adapter(strong, tmp_path / "merged-strong", dtype="bf16").rounding.warning() is None


def test_merge_refuses_a_non_empty_directory_unless_forced(tiny_adapter, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--force"):
        merge_adapter(tiny_adapter, out)
    assert main(["merge", "--adapter", str(tiny_adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "Traceback" not in err
    assert (out / "keep.txt").read_text() == "mine"

    assert main(["merge", "--adapter", str(tiny_adapter), "--out", str(out), "--force", "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "rounding to bf16" in printed and "model.safetensors" in printed
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_merge_rejects_bad_input_with_exit_code_2(tiny_adapter, tmp_path, capsys):
    assert main(["merge", "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_config.json" in capsys.readouterr().err
    assert main(["merge", "--adapter", str(tiny_adapter), "--out", str(tiny_adapter), "--force"]) == 2
    assert "adapter or base model directory" in capsys.readouterr().err
    assert (tiny_adapter / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "o").exists()
