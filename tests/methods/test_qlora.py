"""LoRA on a 4-bit or 8-bit base (bitsandbytes), against PEFT on the same quantized model: outputs,
gradients, files both ways, merging, prepare_model_for_kbit_training, and the typed refusals."""

import gc
import re
import sys
from pathlib import Path

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import lorakit  # noqa: E402
from lorakit import ConfigError  # noqa: E402
from lorakit.io import BASE_PRECISION_KEY, read_metadata  # noqa: E402
from lorakit.models import load_model  # noqa: E402
from lorakit.models.quantized import base_quantization, check_quantized, dequantize_model  # noqa: E402
from lorakit.variants.quantized import import_bitsandbytes  # noqa: E402

IDS = torch.tensor([[1, 5, 9, 33, 7, 100, 42, 3000]])
QUANTIZATIONS = {
    "nf4-double": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": BitsAndBytesConfig(load_in_8bit=True),
}


def load(model_dir, kind: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=QUANTIZATIONS[kind], dtype=dtype)


def same_path(model):
    """PEFT's own layers let bitsandbytes repack a 4-bit weight for its bf16 CPU inference kernel at an
    eval forward (lorakit's layers keep the standard layout: see lorakit.variants.quantized); outputs
    are compared with both on the standard kernel."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


def ours_name(name: str) -> str:
    """lorakit's parameter name in PEFT's spelling."""
    return re.sub(r"adapters\.(\w+)\.(lora_[AB])$", r"\2.\1.weight", name)


def trained_pair(model_dir, kind, config_kwargs):
    """(lorakit model, PEFT model): the same seed, the same quantized base, one forward and backward."""
    pair = []
    for lib in (lorakit, peft):
        torch.manual_seed(0)
        model = lib.get_peft_model(lib.prepare_model_for_kbit_training(load(model_dir, kind)),
                                   lib.LoraConfig(**config_kwargs))
        out = model(input_ids=IDS, labels=IDS)
        out.loss.backward()
        pair.append((model, out))
    return pair


@pytest.mark.parametrize("kind", list(QUANTIZATIONS))
def test_outputs_gradients_and_files_match_peft(tiny_model_dir, tmp_path, kind, capsys):
    settings = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    (ours, ours_out), (theirs, theirs_out) = trained_pair(tiny_model_dir, kind, settings)
    wrapped = [m for m in ours.modules() if getattr(m, "quantized", None) is not None]
    assert len(wrapped) == 14  # 7 projections x 2 layers, every one a bitsandbytes layer
    assert torch.equal(ours_out.logits, theirs_out.logits)
    grads = {ours_name(n): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == their_grads.keys() and len(grads) == 28
    for name, grad in grads.items():
        assert torch.equal(grad, their_grads[name]), name
    # the parameter count, with PEFT's rule for 4-bit storage (two weights a byte)
    ours.print_trainable_parameters()
    theirs.print_trainable_parameters()
    ours_line, theirs_line = capsys.readouterr().out.strip().splitlines()
    assert ours_line == theirs_line
    # the files: the same tensors; ours also records the base's precision
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "ours/adapter_model.safetensors"), load_file(tmp_path / "theirs/adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    precision = "int8" if kind == "int8" else kind.split("-")[0]
    assert read_metadata(tmp_path / "ours")[BASE_PRECISION_KEY] == precision
    assert base_quantization(tmp_path / "ours") == precision and base_quantization(tmp_path / "theirs") is None
    # both ways: each library loads the other's file onto a fresh quantized base, same outputs
    with torch.no_grad():
        expected = same_path(theirs.eval())(input_ids=IDS).logits
        mine = lorakit.PeftModel.from_pretrained(load(tiny_model_dir, kind), str(tmp_path / "theirs")).eval()
        peft_loads_ours = same_path(peft.PeftModel.from_pretrained(load(tiny_model_dir, kind),
                                                                   str(tmp_path / "ours")).eval())
        assert torch.equal(mine(input_ids=IDS).logits, expected)
        assert torch.equal(peft_loads_ours(input_ids=IDS).logits, expected)


@pytest.mark.parametrize("kind", ["nf4-double", "int8"])
def test_merge_requantizes_as_peft_does_and_unmerge_restores(tiny_model_dir, kind):
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    (ours, _), (theirs, _) = trained_pair(tiny_model_dir, kind, settings)
    layer = ours.base_model.model.model.layers[0].self_attn.q_proj
    before = layer.base_weight().clone()
    with torch.no_grad():
        ours.eval()
        unmerged = ours(input_ids=IDS).logits
        same_path(theirs.eval())
        ours.merge_adapter()
        theirs.merge_adapter()
        merged = ours(input_ids=IDS).logits
        assert torch.equal(merged, theirs(input_ids=IDS).logits)  # the same requantized weights
        # requantizing W + dW rounds it again: close to the unmerged outputs, not equal
        assert 0 < (merged - unmerged).abs().max() < 0.5
        # merging stores W + dW quantized again, unmerging stores that minus dW quantized again
        delta = layers_delta(layer)
        assert torch.equal(layer.base_weight(), roundtrip(before + delta, kind))
        ours.unmerge_adapter()
        assert torch.equal(layer.base_weight(), roundtrip(roundtrip(before + delta, kind) - delta, kind))
        plain = ours.merge_and_unload()
    assert type(plain.model.layers[0].self_attn.q_proj) is type(layer.base_layer)  # still quantized, as PEFT


def layers_delta(layer):
    return layer.adapters["default"].delta_weight()


def roundtrip(weight, kind):
    """``weight`` quantized as the layers of ``kind`` store it, and dequantized, by bitsandbytes itself."""
    if kind == "int8":
        param = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
        return bnb.functional.int8_vectorwise_dequant(param.CB, param.SCB).float()
    codes, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True,
                                                quant_type="nf4")
    return bnb.functional.dequantize_4bit(codes, state).float()


def test_prepare_model_for_kbit_training_does_what_peft_does(tiny_model_dir):
    models = [load(tiny_model_dir, "nf4-double", dtype=torch.bfloat16) for _ in range(2)]
    lorakit.prepare_model_for_kbit_training(models[0])
    peft.prepare_model_for_kbit_training(models[1])
    ours, theirs = (dict(m.named_parameters()) for m in models)
    assert {n: (p.dtype, p.requires_grad) for n, p in ours.items()} == \
           {n: (p.dtype, p.requires_grad) for n, p in theirs.items()}
    assert ours["model.norm.weight"].dtype == torch.float32  # bf16 norms cast up, 4-bit weights kept
    assert type(ours["model.layers.0.self_attn.q_proj.weight"]).__name__ == "Params4bit"
    assert all(m.is_gradient_checkpointing for m in models)
    embeds = models[0].get_input_embeddings()(IDS)
    assert embeds.requires_grad  # enable_input_require_grads, for reentrant checkpointing


def test_an_eval_forward_before_training_leaves_the_gradients_exact(tiny_model_dir):
    """bitsandbytes repacks a 4-bit weight for a kernel without backward at an eval forward on AVX512-BF16
    CPUs; a LoRA layer keeps its base in the layout gradients flow through."""
    grads = []
    for warm in (False, True):
        torch.manual_seed(0)
        model = lorakit.get_peft_model(load(tiny_model_dir, "nf4-double"),
                                       lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        if warm:
            with torch.no_grad():
                model.eval()(input_ids=IDS)
            model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_dequantized_model_computes_what_the_quantized_one_did(tiny_model_dir):
    model = lorakit.get_peft_model(load(tiny_model_dir, "nf4-double"),
                                   lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).eval()
    with torch.no_grad():
        quantized = model(input_ids=IDS).logits
        dequantize_model(model)
        assert not any(getattr(m, "quantized", None) for m in model.modules())
        assert not any(type(p).__name__ == "Params4bit" for p in model.parameters())
        torch.testing.assert_close(model(input_ids=IDS).logits, quantized, atol=1e-4, rtol=1e-4)
    assert not hasattr(model.get_base_model().config, "quantization_config")


def test_dora_and_base_weight_inits_on_a_quantized_base_are_refused(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"use_dora=True: .*4-bit or 8-bit base.*use_dora=False"):
        lorakit.get_peft_model(load(tiny_model_dir, "nf4-double"),
                               lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match=r"init_lora_weights='pissa' cannot initialise(.|\n)*needs a float32, "
                                          r"float16 or bfloat16 base \(initialise before quantizing"):
        lorakit.get_peft_model(load(tiny_model_dir, "int8"),
                               lorakit.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))


def test_a_model_with_nothing_quantized_and_a_missing_bitsandbytes_are_typed_errors(tiny_model_dir, monkeypatch):
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(ConfigError, match=r"--quantize nf4: .* has no linear layers that bitsandbytes quantizes"):
        check_quantized(plain, "nf4", tiny_model_dir)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"needs bitsandbytes.*pip install 'lorakit\[qlora\]'"):
        import_bitsandbytes()


def test_a_quantized_load_lets_go_of_the_weights_file(tiny_model_dir):
    """The unquantized tensors (embeddings, norms) are copied out of the file: a tensor read straight from
    it would keep the whole mapping, and every page of the original weights quantizing read, resident."""
    weights = str(tiny_model_dir / "model.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=QUANTIZATIONS["nf4-double"])
    assert weights in Path("/proc/self/maps").read_text()  # what transformers' own load leaves
    del plain
    gc.collect()
    model, _ = load_model(tiny_model_dir, quantize="nf4")
    gc.collect()
    assert weights not in Path("/proc/self/maps").read_text()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
