"""head_cross_entropy against F.cross_entropy on the full fp32 logits: loss and gradients."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GraniteConfig, GraniteForCausalLM

from lorakit import LoraConfig, get_peft_model
from lorakit.evaluation import loss_sum
from lorakit.layer import LoraLinear
from lorakit.kernels.loss import STATS, head_cross_entropy, head_log_probs


def _reference(hidden, head, labels):
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def _data(n=37, h=16, v=50, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, labels


def _frozen_head(h=16, v=50, bias=False, dtype=torch.float32):
    torch.manual_seed(0)
    head = nn.Linear(h, v, bias=bias, dtype=dtype)
    head.requires_grad_(False)
    return head


@pytest.mark.parametrize("chunk", [1, 8, 37, 1000])
@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_fp32_loss_and_hidden_gradient(chunk, bias):
    head = _frozen_head(bias=bias)
    hidden, labels = _data()
    h1 = hidden.clone().requires_grad_(True)
    loss = head_cross_entropy(h1, head, labels, chunk=chunk)
    (loss * 0.5).backward()  # the backward scales by the incoming gradient
    h2 = hidden.clone().requires_grad_(True)
    ref = _reference(h2, head, labels)
    (ref * 0.5).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_head_with_an_adapter_gets_its_gradients():
    torch.manual_seed(0)
    head = LoraLinear(nn.Linear(16, 50, bias=False))
    head.base_layer.requires_grad_(False)
    adapter = head.add_adapter("default", r=4, lora_alpha=8, init=False)
    head.active_adapters = ["default"]
    hidden, labels = _data()

    def run(fn):
        adapter.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_(True)
        loss = fn(h)
        loss.backward()
        return loss.detach(), h.grad, adapter.lora_A.grad.clone(), adapter.lora_B.grad.clone()

    got = run(lambda h: head_cross_entropy(h, head, labels, chunk=10))
    want = run(lambda h: _reference(h, head, labels))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_within_rounding():
    head = _frozen_head(dtype=torch.bfloat16)
    hidden, labels = _data(dtype=torch.bfloat16)
    h1 = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = head_cross_entropy(h1, head, labels, chunk=16)
    loss.backward()
    h2 = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _reference(h2, head, labels)
    ref.backward()
    assert h1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), rtol=2e-2, atol=2e-2)


def test_no_grad_and_empty_input():
    head = _frozen_head()
    hidden, labels = _data()
    with torch.no_grad():
        torch.testing.assert_close(head_cross_entropy(hidden, head, labels, chunk=5),
                                   _reference(hidden, head, labels), rtol=1e-5, atol=1e-5)
    empty = head_cross_entropy(hidden[:0], head, labels[:0])
    assert float(empty) == 0.0


@pytest.mark.parametrize("scaling", [1.0, 4.0])
def test_loss_sum_equals_the_models_own_logits_for_a_granite_that_scales_them(scaling):
    """Granite divides its logits by ``logits_scaling``: the head on label positions alone would
    miss that, so loss_sum takes the model's own logits there (and the fast head where it is 1)."""
    torch.manual_seed(0)
    config = GraniteConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=97, logits_scaling=scaling)
    model = get_peft_model(GraniteForCausalLM(config), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 97, (2, 9))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    got, count = loss_sum(model, batch)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1]
    mask = labels[:, 1:] != -100
    expected = F.cross_entropy(logits[mask].float(), labels[:, 1:][mask], reduction="sum")
    assert count == int(mask.sum())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _token_reference(hidden, head, labels, temperature):
    z = head(hidden).float() / temperature
    log_p = torch.log_softmax(z, dim=-1)
    return {"log_probs": log_p.gather(1, labels[:, None]).squeeze(1),
            "entropy": -(log_p.exp() * log_p).sum(-1),
            "log_sum_sq_probs": torch.logsumexp(2 * log_p, dim=-1),
            "mean_logits": z.mean(-1), "is_top1": z.argmax(-1) == labels}


@pytest.mark.parametrize("head_kind", ["frozen", "frozen-bias", "adapter"])
@pytest.mark.parametrize("chunk, temperature, through_entropy", [(8, 1.0, False), (1000, 0.6, True)])
def test_head_log_probs_per_token_values_and_gradients_equal_the_full_logits(head_kind, chunk, temperature,
                                                                             through_entropy):
    if head_kind == "adapter":
        torch.manual_seed(0)
        head = LoraLinear(nn.Linear(16, 50, bias=False))
        head.base_layer.requires_grad_(False)
        head.add_adapter("default", r=4, lora_alpha=8, init=False)
        head.active_adapters = ["default"]
    else:
        head = _frozen_head(bias=head_kind == "frozen-bias")
    hidden, labels = _data()
    weights = torch.linspace(-1, 1, len(labels))  # a different incoming gradient per token

    def run(fn):
        head.zero_grad(set_to_none=True)
        h = hidden.clone().requires_grad_(True)
        out = fn(h)
        total = (out["log_probs"] * weights).sum() + (out["entropy"] * weights.flip(0)).sum() * through_entropy
        total.backward()
        grads = [h.grad] + [p.grad for p in head.parameters() if p.requires_grad]
        return {k: v.detach() for k, v in out.items()}, grads

    got, got_grads = run(lambda h: head_log_probs(h, head, labels, temperature=temperature, chunk=chunk,
                                                  stats=STATS))
    want, want_grads = run(lambda h: _token_reference(h, head, labels, temperature))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert len(got_grads) == len(want_grads) == (1 if head_kind != "adapter" else 3)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_head_log_probs_refuses_an_unknown_statistic():
    from lorakit.errors import ConfigError

    hidden, labels = _data()
    with pytest.raises(ConfigError, match="unknown statistics"):
        head_log_probs(hidden, _frozen_head(), labels, stats=("perplexity",))


def test_head_log_probs_backward_through_the_log_probs_alone_recomputes_nothing():
    """An output no loss uses (the entropy TRL only logs) gets no gradient work: the backward of a
    frozen linear head scales the Jacobian saved in the forward and never calls the head again."""
    head = _frozen_head()
    calls = []
    head.register_forward_hook(lambda *a: calls.append(1))
    hidden, labels = _data()
    h = hidden.clone().requires_grad_(True)
    out = head_log_probs(h, head, labels, stats=STATS)
    out["log_probs"].sum().backward()
    assert not calls and h.grad is not None
    out = head_log_probs(h, head, labels)
    out["entropy"].sum().backward()  # a gradient through the entropy: recomputed chunk by chunk
    assert calls
