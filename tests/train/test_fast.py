"""The trainer's speed settings: each keeps the loss and gradients of the plain model."""

import copy

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import IGNORE_INDEX, Example, PackingCollator
from lorakit.errors import ConfigError
from lorakit.evaluation import loss_sum
from lorakit.kernels import attention as kernel_attention
from lorakit.kernels import fused
from lorakit.models import attention as model_attention
from lorakit.models.attention import ATTENTION
from lorakit.train import fast

from core.tiny import SEVEN, input_ids, tiny_llama


def _model():
    return get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False))


def _batch():
    ids = input_ids(batch=3, length=12)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    mask[2, -3:] = 0
    labels[2, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss, count = loss_sum(model, batch)
    (loss / count).backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol=1e-5):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=1e-6)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=1e-6, msg=name)


def test_every_fast_path_together_matches_the_plain_reference_in_fp32():
    """Fused LoRA layers + lorakit attention + fused norms + chunked head + checkpointing vs the plain forward."""
    model, batch = _model(), _batch()
    reference = copy.deepcopy(model)
    notes = fast.speed_up(model, attention="auto", gradient_checkpointing=True)
    assert any("5 RMSNorm modules fused" in n for n in notes)
    assert model.get_base_model().config._attn_implementation == ATTENTION
    assert any("checkpointing" in n for n in notes)
    with fused.disabled(reference):
        want = _loss_and_grads(reference, batch)
    _assert_same(_loss_and_grads(model, batch), want)


def test_fused_adamw_takes_the_same_step():
    model_a, model_b, batch = _model(), _model(), _batch()
    opts = []
    for model, use_fast in ((model_a, True), (model_b, False)):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = fast.make_optimizer(params, lr=1e-2, weight_decay=0.1) if use_fast else \
            torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            _loss_and_grads(model, batch)
            opt.step()
        opts.append(opt)
    assert opts[0].defaults["fused"] is True
    for (n, a), (_, b) in zip(model_a.named_parameters(), model_b.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_compile_traces_the_fused_paths(monkeypatch):
    """torch.compile's tracer runs through the fused layers and attention (eager backend: no C++ build)."""
    original = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: original(self, backend="eager", **kw))
    torch._dynamo.reset()
    model, batch = _model(), _batch()
    reference = copy.deepcopy(model)
    fast.speed_up(model, compile=True)
    _assert_same(_loss_and_grads(model, batch), _loss_and_grads(reference, batch))


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="attention='flash'"):
        fast.speed_up(_model(), attention="flash")
    gpt2_like = _model()
    gpt2_like.get_base_model().config.model_type = "gpt2"
    with pytest.raises(ConfigError, match="Llama-family"):
        fast.speed_up(gpt2_like, attention="lorakit")
    assert "the model's own" in fast.speed_up(gpt2_like, attention="auto")[0]


def test_a_compiled_model_reads_each_one_row_batch_by_its_own_boundaries(monkeypatch):
    """The attention's per-example layout depends on the values of ``cu_seq_lens``: under torch.compile
    it runs eagerly, so a second batch with other boundaries is not read with the first one's layout."""
    original = torch.nn.Module.compile  # aot_eager: no C++ build; dynamic shapes, under which tracing it fails
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, **kw: original(self, backend="aot_eager", **(kw | {"dynamic": True})))
    torch._dynamo.reset()
    model = _model()
    reference = copy.deepcopy(model)
    fast.speed_up(reference)
    fast.speed_up(model, compile=True)
    collate = PackingCollator(pad_token_id=0, varlen=True, share_prefix=True)
    generator = torch.Generator().manual_seed(0)
    for lengths in ((9, 14, 6), (12, 5, 11, 8)):  # same prefix, other boundaries
        examples = []
        for n in lengths:
            ids = [5, 6, 7] + torch.randint(8, 100, (n,), generator=generator).tolist()
            examples.append(Example(ids, [IGNORE_INDEX] * 4 + ids[4:], "t"))
        batch = collate(examples)
        _assert_same(_loss_and_grads(model, batch), _loss_and_grads(reference, batch))


def test_a_one_row_batch_is_laid_out_once_per_forward_not_per_layer(monkeypatch):
    """The per-example layout of a one-row batch is built once by the model call's caller and
    passed to every layer (no cache, no rebuilding in each of the model's layers)."""
    model = _model()
    fast.speed_up(model)
    built = []

    def counted(*args, **kwargs):
        built.append(args)
        return kernel_attention.varlen_layout(*args, **kwargs)

    monkeypatch.setattr(model_attention, "varlen_layout", counted)
    collate = PackingCollator(pad_token_id=0, varlen=True, share_prefix=True)
    examples = [Example([5, 6, 7] + list(range(8, 8 + n)), [IGNORE_INDEX] * 4 + list(range(9, 8 + n)), "t")
                for n in (9, 14, 6)]
    batch = collate(examples)
    assert len(model.get_base_model().model.layers) > 1
    _loss_and_grads(model, batch)
    assert len(built) == 1
