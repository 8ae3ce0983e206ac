"""The fused RMSNorm against transformers' LlamaRMSNorm: outputs and input gradients."""

import copy

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from lorakit.models.norms import use_fused_norms

from core.tiny import input_ids, tiny_llama


def _norm(dtype):
    norm = LlamaRMSNorm(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=torch.Generator().manual_seed(0))
    norm.weight.requires_grad_(False)
    return norm


def _run(norm, x, g):
    x = x.clone().requires_grad_(True)
    y = norm(x)
    (y.float() * g).sum().backward()
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_matches_transformers(dtype, tol):
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 7, 48, generator=gen) * 3).to(dtype)
    g = torch.randn(3, 7, 48, generator=gen)
    ref = _norm(dtype)
    fused = copy.deepcopy(ref)
    assert use_fused_norms(fused) == 1 and isinstance(fused, LlamaRMSNorm)
    (y, gx), (y_ref, gx_ref) = _run(fused, x, g), _run(ref, x, g)
    assert y.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(gx.float(), gx_ref.float(), rtol=tol, atol=tol)


def test_trainable_weight_keeps_its_gradient():
    norm = _norm(torch.float32)
    norm.weight.requires_grad_(True)
    fused = copy.deepcopy(norm)
    use_fused_norms(fused)
    x, g = torch.randn(4, 48), torch.randn(4, 48)
    _run(fused, x, g)
    _run(norm, x, g)
    torch.testing.assert_close(fused.weight.grad, norm.weight.grad)


def test_whole_model_same_logits_and_state_dict():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    assert use_fused_norms(model) == 2 * 2 + 1  # two per layer and the final norm
    assert use_fused_norms(model) == 5  # idempotent
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert model.state_dict().keys() == ref.state_dict().keys()
    copy.deepcopy(model)(input_ids=ids)
