"""lorakit's training attention against transformers' sdpa: outputs and gradients, causal,
padded and packed, fp32 and bf16, and the fallbacks."""

import copy

import pytest
import torch
import torch.nn.functional as F

from lorakit.errors import DataError
from lorakit.kernels import attention as kernel
from lorakit.kernels.attention import varlen_layout
from lorakit.models.attention import ATTENTION, lorakit_attention, supports, use_lorakit_attention, varlen_inputs

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


def _stream(lengths, seed=0):
    """q, k, v of examples laid end to end in one row (1, H, T, D), and their boundaries."""
    q, k, v = (t.detach() for t in _qkv(b=1, s=sum(lengths), seed=seed))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return [t.requires_grad_(True) for t in (q, k, v)], cu


def _each_alone(q, k, v, cu):
    """sdpa on each example of the stream by itself, joined again: (1, T, H, D)."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        causal = torch.ones(b - a, b - a, dtype=torch.bool).tril()[None, None]
        outs.append(_sdpa(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal))
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("lengths", [[5, 70, 1, 33], [64], [3, 2]])  # 70, 64: the two-block path inside
def test_a_stream_of_examples_with_boundaries_equals_each_example_alone(lengths):
    (q, k, v), cu = _stream(lengths)
    t = sum(lengths)
    # the mask transformers builds for the row is not what keeps the examples apart here: pass none
    out_grad = torch.randn(1, t, 4, 8, generator=torch.Generator().manual_seed(3))
    ours, g_ours = _grads(lambda q, k, v: lorakit_attention(_Module(), q, k, v, None, cu_seq_lens_q=cu,
                                                            cu_seq_lens_k=cu)[0], (q, k, v), out_grad)
    ref, g_ref = _grads(lambda q, k, v: _each_alone(q, k, v, cu), (q, k, v), out_grad)
    assert ours.shape == (1, t, 4, 8)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _with_prefix_alone(q, k, v, cu, prefix):
    """sdpa on each example (the shared prefix, then its own segment) by itself; the prefix's
    output taken from the first example, as the stream holds it once: (1, T, H, D)."""
    outs = []
    for b, (a, e) in enumerate(zip(cu[1:-1].tolist(), cu[2:].tolist())):
        rows = torch.cat([torch.arange(prefix), torch.arange(a, e)])
        n = len(rows)
        causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
        out = _sdpa(q[:, :, rows], k[:, :, rows], v[:, :, rows], causal)  # (1, n, H, D)
        outs.append(out if b == 0 else out[:, prefix:])
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("lengths", [[4, 5, 70, 1], [30, 40, 9]])  # the first: the prefix
def test_a_stream_with_a_shared_prefix_equals_each_example_with_the_prefix_alone(lengths):
    (q, k, v), cu = _stream(lengths)
    prefix, t = lengths[0], sum(lengths)
    out_grad = torch.randn(1, t, 4, 8, generator=torch.Generator().manual_seed(3))
    ours, g_ours = _grads(lambda q, k, v: lorakit_attention(_Module(), q, k, v, None, cu_seq_lens_q=cu,
                                                            cu_seq_lens_k=cu, lorakit_shared_prefix=prefix)[0],
                          (q, k, v), out_grad)
    ref, g_ref = _grads(lambda q, k, v: _with_prefix_alone(q, k, v, cu, prefix), (q, k, v), out_grad)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_ours, g_ref):  # the prefix's k and v: the sum over every example that saw them
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the whole-row mask for attention that cannot take the padded rows says the same
    fallback = _sdpa(q, k, v, kernel.stream_mask(cu, prefix))
    torch.testing.assert_close(fallback.detach(), ref, rtol=1e-5, atol=1e-6)


def test_the_stream_layout_pads_each_example_to_the_longest_and_is_passed_in_once_per_batch():
    cu = torch.tensor([0, 3, 4, 6], dtype=torch.int32)
    index, inverse, mask = varlen_layout(cu)
    inputs = varlen_inputs(cu)  # the model call's keywords: the one layout every layer reads
    assert inputs["cu_seq_lens_q"] is inputs["cu_seq_lens_k"] is cu and "lorakit_shared_prefix" not in inputs
    assert all(torch.equal(a, b) for a, b in zip(inputs["lorakit_varlen_layout"], (index, inverse, mask)))
    assert index.tolist() == [0, 1, 2, 3, 0, 0, 4, 5, 0]  # padding slots point anywhere (position 0)
    assert inverse.tolist() == [0, 1, 2, 3, 6, 7]
    assert mask.shape == (3, 1, 3, 3)
    assert mask[1, 0].tolist() == [[True, False, False]] * 3  # the padding rows of a 1-token example see it only
    assert mask[2, 0].tolist() == [[True, False, False], [True, True, False], [True, True, False]]
    with pytest.raises(DataError, match="example boundaries"):
        varlen_layout(torch.tensor([1, 3], dtype=torch.int32))
    # a shared prefix of 2: rows are the prefix, then each example's own tokens
    index, inverse, mask = varlen_layout(torch.tensor([0, 2, 5, 6], dtype=torch.int32), prefix=2)
    assert index.tolist() == [0, 1, 2, 3, 4, 0, 1, 5, 0, 0]
    assert inverse.tolist() == [0, 1, 2, 3, 4, 7]  # the prefix read back from the first row only
    with pytest.raises(DataError, match="shared prefix"):
        varlen_layout(torch.tensor([0, 3, 5], dtype=torch.int32), prefix=2)


def test_a_stream_too_large_for_the_saved_probabilities_falls_back_to_the_models_mask(monkeypatch):
    (q, k, v), cu = _stream([6, 9])
    seq = torch.repeat_interleave(torch.arange(2), torch.tensor([6, 9]))
    block = (torch.ones(15, 15, dtype=torch.bool).tril() & (seq[:, None] == seq[None, :]))[None, None]
    expected = _each_alone(q, k, v, cu)
    monkeypatch.setattr(kernel, "MAX_SCORES", 4 * 9 * 9 - 1)  # the padded rows would need 2 x 4 x 9 x 9
    out, _ = lorakit_attention(_Module(), q, k, v, block, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # with a shared prefix the model's own mask (built from position ids) would be wrong: it is replaced
    (q, k, v), cu = _stream([3, 6, 9])
    out, _ = lorakit_attention(_Module(), q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, lorakit_shared_prefix=3)
    torch.testing.assert_close(out, _with_prefix_alone(q, k, v, cu, 3), rtol=1e-5, atol=1e-6)
    # and so with the layout passed in, as the model call passes it (varlen_inputs)
    out, _ = lorakit_attention(_Module(), q, k, v, None, **varlen_inputs(cu, 3))
    torch.testing.assert_close(out, _with_prefix_alone(q, k, v, cu, 3), rtol=1e-5, atol=1e-6)


def test_boundaries_that_do_not_cover_the_row_are_refused():
    (q, k, v), cu = _stream([6, 9])
    with pytest.raises(DataError, match="whole one-row batch"):
        lorakit_attention(_Module(), q[:, :, :14], k[:, :, :14], v[:, :, :14], None, cu_seq_lens_q=cu)


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
