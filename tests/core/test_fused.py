"""The fused LoRA linear path against the reference forward: outputs and gradients.

fp32 must agree to rtol 1e-5; bf16 (autocast, as the trainer runs) within bf16 rounding.
"""

import copy

import pytest
import torch
import torch.nn as nn

from lorakit import LoraConfig, get_peft_model
from lorakit.kernels import fused
from lorakit.layer import LoraLinear

from .tiny import SEVEN, input_ids, tiny_llama


def _layer(bias: bool, dropout: float = 0.0, dtype=torch.float32, seed: int = 0) -> LoraLinear:
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(24, 40, bias=bias, dtype=dtype))
    layer.base_layer.weight.requires_grad_(False)
    if bias:
        layer.base_layer.bias.requires_grad_(False)
    adapter = layer.add_adapter("default", r=4, lora_alpha=8, lora_dropout=dropout, init=False)
    layer.active_adapters = ["default"]
    return layer, adapter


def _run(layer, x, autocast=False, seed=0):
    torch.manual_seed(seed)  # the same dropout mask on both paths
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = layer(x)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    (y.float() * g).sum().backward()
    a = layer.adapters["default"]
    grads = (x.grad, a.lora_A.grad, a.lora_B.grad)
    a.lora_A.grad = a.lora_B.grad = None
    return y.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fp32_matches_reference(bias, dropout):
    layer, _ = _layer(bias, dropout)
    layer.train()
    x = torch.randn(3, 5, 24)
    y_fast, g_fast = _run(layer, x)
    with fused.disabled(layer):
        y_ref, g_ref = _run(layer, x)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-6)
    for fast, ref in zip(g_fast, g_ref):
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_reference_within_rounding():
    layer, _ = _layer(bias=True, dtype=torch.bfloat16)  # the trainer's layout: bf16 base, fp32 adapter
    x = torch.randn(4, 6, 24, dtype=torch.bfloat16)
    y_fast, g_fast = _run(layer, x, autocast=True)
    with fused.disabled(layer):
        y_ref, g_ref = _run(layer, x, autocast=True)
    assert y_fast.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y_fast.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    for fast, ref in zip(g_fast, g_ref):
        assert fast.dtype == ref.dtype  # fp32 adapter gradients, bf16 input gradient
        torch.testing.assert_close(fast.float(), ref.float(), rtol=3e-2, atol=3e-2)


def test_frozen_weight_gets_no_gradient_and_trainable_one_does():
    layer, _ = _layer(bias=True)
    x = torch.randn(2, 24)
    _run(layer, x)
    assert layer.base_layer.weight.grad is None and layer.base_layer.bias.grad is None
    layer.base_layer.weight.requires_grad_(True)
    layer.base_layer.bias.requires_grad_(True)
    _run(layer, x)
    w_fast, b_fast = layer.base_layer.weight.grad.clone(), layer.base_layer.bias.grad.clone()
    layer.base_layer.weight.grad = layer.base_layer.bias.grad = None
    with fused.disabled(layer):
        _run(layer, x)
    torch.testing.assert_close(w_fast, layer.base_layer.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b_fast, layer.base_layer.bias.grad, rtol=1e-5, atol=1e-6)


def test_mixed_dtypes_without_autocast_use_the_reference_rule():
    """A bf16 base with fp32 adapters outside autocast: the update is computed in fp32, as before."""
    layer, adapter = _layer(bias=False, dtype=torch.bfloat16)
    assert fused.compute_dtype(torch.ones(1, 24, dtype=torch.bfloat16), layer.base_layer.weight,
                               adapter.lora_A) is None
    x = torch.randn(2, 24, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        with fused.disabled(layer):
            ref = layer(x)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)


def test_whole_model_loss_and_gradients_match_reference():
    """A tiny Llama with adapters on all seven projections: the fused model is the reference model."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False))
    model.train()
    ids = input_ids(batch=2, length=9)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    loss_fast, grads_fast = loss_and_grads()
    with fused.disabled(model):
        loss_ref, grads_ref = loss_and_grads()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=0)
    assert grads_fast.keys() == grads_ref.keys() and len(grads_fast) == 2 * 7 * 2
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_two_active_adapters_still_sum_both():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("other", LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    ids = input_ids()
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    layer.active_adapters = ["default", "other"]
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + sum(
            (x @ a.lora_A.T @ a.lora_B.T) * a.scaling for a in layer.adapters.values())
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert ids.shape == (2, 7)


def test_disabled_is_restored_after_an_error():
    layer, _ = _layer(bias=False)
    assert layer.use_fused and isinstance(layer, fused.FusedLayer)
    with pytest.raises(RuntimeError):
        with fused.disabled(layer):
            assert not layer.use_fused
            raise RuntimeError("boom")
    assert layer.use_fused


def test_disabled_switches_only_the_given_model_and_nests():
    """The switch is each layer's own: a block for one model leaves another model's layers fused."""
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=SEVEN))
    other = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=SEVEN))
    layers = [m for m in model.modules() if isinstance(m, fused.FusedLayer)]
    assert len(layers) == 2 * 7
    with fused.disabled(model):
        with fused.disabled(model):
            assert not any(layer.use_fused for layer in layers)
        assert not any(layer.use_fused for layer in layers)
        assert all(m.use_fused for m in other.modules() if isinstance(m, fused.FusedLayer))
    assert all(layer.use_fused for layer in layers)


def test_deepcopy_keeps_fused_layers_working():
    layer, _ = _layer(bias=False)
    clone = copy.deepcopy(layer)
    x = torch.randn(2, 24)
    torch.testing.assert_close(clone(x), layer(x))
