"""lorakit's training attention against transformers' sdpa: outputs and gradients, causal,
padded and packed, fp32 and bf16, and the fallbacks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lorakit.models.attention import ATTENTION, lorakit_attention, supports, use_lorakit_attention

from core.tiny import input_ids, tiny_llama


class _Module:
    is_causal = True
    num_key_value_groups = 2


def _qkv(b=2, h=4, hkv=2, s=11, d=8, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, s, d, generator=g).to(dtype).requires_grad_(True) for n in (h, hkv, hkv)]


def _sdpa(q, k, v, mask):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


def _grads(fn, tensors, out_grad):
    out = fn(*tensors)
    (out.float() * out_grad).sum().backward()
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["causal", "padded", "packed"])
@pytest.mark.parametrize("length", [11, 70, 71])  # 70, 71: long enough for the two-block path
def test_matches_sdpa_fp32(kind, length):
    q, k, v = _qkv(s=length)
    s = q.shape[2]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    if kind == "causal":
        mask = causal[None, None].expand(2, 1, s, s)
    elif kind == "padded":  # second row: the last 4 positions are padding
        keep = torch.ones(2, s, dtype=torch.bool)
        keep[1, -4:] = False
        mask = causal[None, None] & keep[:, None, None, :]
        mask = mask | torch.eye(s, dtype=torch.bool)  # sdpa needs no fully masked row; ours copes either way
    else:  # two examples in each row, the second starting before the middle
        seq = torch.tensor([0] * 5 + [1] * (s - 5))
        mask = (causal & (seq[:, None] == seq[None, :]))[None, None].expand(2, 1, s, s)
    out_grad = torch.randn(2, s, 4, 8, generator=torch.Generator().manual_seed(3))
    ours, g_ours = _grads(lambda q, k, v: lorakit_attention(_Module(), q, k, v, mask)[0], (q, k, v), out_grad)
    ref, g_ref = _grads(lambda q, k, v: _sdpa(q, k, v, mask), (q, k, v), out_grad)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_no_mask_means_causal_and_bf16_within_rounding():
    q, k, v = _qkv(dtype=torch.bfloat16)
    s = q.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool).tril()[None, None]
    out_grad = torch.randn(2, s, 4, 8, generator=torch.Generator().manual_seed(3))
    ours, g_ours = _grads(lambda q, k, v: lorakit_attention(_Module(), q, k, v, None)[0], (q, k, v), out_grad)
    ref, g_ref = _grads(lambda q, k, v: _sdpa(q.float(), k.float(), v.float(), mask), (q, k, v), out_grad)
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), ref, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-2)


def test_a_fully_masked_row_gives_no_nan():
    q, k, v = _qkv(s=4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[..., 0] = True
    mask[1, :, 3, :] = False  # a padding query that may attend to nothing
    out, _ = lorakit_attention(_Module(), q, k, v, mask)
    assert torch.isfinite(out).all()


def test_whole_model_matches_sdpa_with_padding_and_gradients():
    model = tiny_llama()
    ids = input_ids(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    ref_model = copy.deepcopy(model)
    assert use_lorakit_attention(model) and model.config._attn_implementation == ATTENTION
    for m in (model, ref_model):
        m.train()
        m.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)
    outs = []
    for m in (model, ref_model):
        logits = m(input_ids=ids, attention_mask=mask).logits
        (logits[mask.bool()].square().mean()).backward()
        outs.append((logits[mask.bool()].detach(), m.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-4, atol=1e-6)


def test_generation_with_a_cache_falls_back_to_sdpa():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    use_lorakit_attention(model)
    ids = input_ids(batch=1, length=5)
    a = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    b = ref.generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_unsupported_models_are_left_alone():
    model = tiny_llama()
    model.config.model_type = "gpt2"
    assert not supports(model) and not use_lorakit_attention(model)
    assert model.config._attn_implementation != ATTENTION
