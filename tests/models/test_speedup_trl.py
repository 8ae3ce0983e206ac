"""`lorakit.speedup` under TRL: SFTTrainer, and TRL's fused LM head served on the label positions with
TRL's outputs and gradients, whichever of the two was installed first."""

import copy

import pytest
import torch
from transformers import DataCollatorWithFlattening

import lorakit
from lorakit import LoraConfig, get_peft_model

from core.tiny import SEVEN
from .test_speedup import _examples, _logged_losses, _model, _padded


@pytest.mark.parametrize("order", ["after", "before"])
def test_trl_sft_trainer_trains_as_without_the_call(order, tiny_model_dir, tmp_path, monkeypatch):
    """TRL's SFTTrainer on padding-free batches, given the transformers model that holds the adapter.
    speedup applied after the trainer is built serves TRL's fused LM head on the label positions
    (TRL's own head never runs); applied before, TRL's head runs for the first micro-batch (calling
    the decoder, which keeps the precision and the packed layout) and speedup serves it from the
    second on. The losses and weights are those without speedup either way."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from lorakit.models import load_model

    runs = []
    for use in (False, True):
        base, tokenizer = load_model(tiny_model_dir)
        torch.manual_seed(0)  # the same adapter initialisation
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False))
        if use and order == "before":
            lorakit.speedup(model, bf16=False, verbose=False)
        args = trl.SFTConfig(str(tmp_path / str(use)), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             learning_rate=1e-2, max_steps=2, logging_steps=1, report_to=[], save_strategy="no",
                             padding_free=True, max_length=None, bf16=False, use_cpu=True, seed=0)
        data = Dataset.from_list(_examples(8))
        trainer = trl.SFTTrainer(model=model.get_base_model(), args=args, train_dataset=data,
                                 processing_class=tokenizer)
        heads = []
        if use and order == "after":
            lorakit.speedup(model, bf16=False, verbose=False)
        apply = trl.trainer.utils._ChunkedLogProbFunction.apply
        monkeypatch.setattr(trl.trainer.utils._ChunkedLogProbFunction, "apply", lambda *a: heads.append(1) or apply(*a))
        trainer.train()
        assert len(heads) == (4 if not use else {"after": 0, "before": 1}[order])  # 2 steps x 2 micro-batches
        monkeypatch.undo()
        runs.append((_logged_losses(trainer), {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
                     trainer.state.log_history))
    assert len(runs[0][0]) == 2
    torch.testing.assert_close(torch.tensor(runs[1][0]), torch.tensor(runs[0][0]), rtol=1e-4, atol=1e-5)
    for name, p in runs[0][1].items():
        torch.testing.assert_close(runs[1][1][name], p, rtol=1e-3, atol=1e-4, msg=name)  # 1% of an AdamW step
    for key in ("entropy", "mean_token_accuracy"):  # TRL's metrics, from the fused head's entropy and is_top1
        logged = [[log[key] for log in run[2] if key in log] for run in runs]
        assert len(logged[0]) == 2
        torch.testing.assert_close(torch.tensor(logged[1]), torch.tensor(logged[0]), rtol=1e-4, atol=1e-5)


def _fused_pair(temperature=1.0, outputs=("log_probs", "entropy", "is_top1"), **head_kwargs):
    """The same LoRA model twice under TRL's fused LM head: TRL's own, and speedup applied after it."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    reference = _model()
    served = copy.deepcopy(reference)
    trl_utils.add_fused_lm_head(reference.get_base_model(), temperature=temperature, outputs=outputs, **head_kwargs)
    trl_utils.add_fused_lm_head(served.get_base_model(), temperature=temperature, outputs=outputs, **head_kwargs)
    lorakit.speedup(served, bf16=False, verbose=False)
    return trl_utils, reference, served


def _fused_step(model, batch, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch, fused_lm_head=True, **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


FUSED_FIELDS = ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


@pytest.mark.parametrize("layout, temperature, outputs", [
    ("padded", 1.0, ("log_probs", "entropy", "is_top1")),
    ("packed", 1.0, ("log_probs", "entropy", "is_top1")),
    ("packed-cu_seq_lens", 0.7, ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")),
    ("shift_labels", 1.0, ("log_probs",)),
])
def test_trl_fused_lm_head_is_served_on_the_label_positions_with_trls_outputs_and_gradients(
        layout, temperature, outputs, monkeypatch):
    trl_utils, reference, served = _fused_pair(temperature, outputs)
    features = _examples()
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=layout == "packed-cu_seq_lens")(features) \
        if layout.startswith("packed") else _padded(features)
    extra = {}
    if layout == "shift_labels":  # pre-shifted labels, as under context parallelism: scored without shifting
        labels = batch.pop("labels")
        extra = {"shift_labels": torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1),
                 "num_items_in_batch": torch.tensor(40)}
    want, want_grads = _fused_step(reference, batch, **extra)
    heads = []  # TRL's own head must not run for the served model: it would score every position
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda *a: heads.append(a))
    got, got_grads = _fused_step(served, batch, **extra)
    assert not heads and isinstance(got, trl_utils.FusedCausalLMOutput)
    for field in FUSED_FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert a.shape == b.shape and a.dtype == b.dtype, field
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=field)
    assert got.log_probs.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] - (not extra))
    assert bool((got.log_probs[~got.label_mask] == 0).all())
    assert want_grads.keys() == got_grads.keys() and got_grads
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_lm_head_under_no_grad_in_eval_and_without_labels_to_score():
    trl_utils, reference, served = _fused_pair()
    batch = _padded(_examples())
    reference.eval(), served.eval()
    with torch.no_grad():
        want, got = reference(**batch, fused_lm_head=True), served(**batch, fused_lm_head=True)
    for field in ("loss", "log_probs", "entropy", "is_top1"):
        torch.testing.assert_close(getattr(got, field), getattr(want, field), rtol=1e-5, atol=1e-5)
    served.train()
    batch["labels"][:] = -100  # nothing to score: a differentiable zero, as TRL's
    out = served(**batch, fused_lm_head=True)
    assert out.loss.item() == 0 and out.loss.requires_grad
    out.loss.backward()


def test_speedup_applied_first_serves_trls_head_from_its_second_call(monkeypatch, capsys):
    """TRL's wrapper outermost (speedup before add_fused_lm_head): the first call runs TRL's head; it
    finds speedup's forward wrapped, wraps it again and says so once; from then on speedup serves it."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    reference = _model()
    first = lorakit.speedup(copy.deepcopy(reference), bf16=False, verbose=False)
    for model in (reference, first):
        trl_utils.add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "is_top1"))
    batch = _padded(_examples())
    want, want_grads = _fused_step(reference, batch)
    heads = []
    apply = trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(trl_utils._ChunkedLogProbFunction, "apply", lambda *a: heads.append(1) or apply(*a))
    for call in range(3):
        got, got_grads = _fused_step(first, batch)
        assert len(heads) == 1, call  # TRL's head ran for the first call only
        torch.testing.assert_close(got.log_probs, want.log_probs, rtol=1e-5, atol=1e-5)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert capsys.readouterr().out.count("served on the label positions from the next step") == 1


@pytest.mark.parametrize("second_call", ["speedup again", "TRL's head taken over"])
def test_the_plain_forward_under_speedup_trl_speedup_is_the_plain_models(second_call):
    """speedup, then TRL's head around it, then speedup around that: a forward that takes no fast
    path (eval, no labels, no fused head) passes through TRL's wrapper to the inner speedup forward,
    which goes on to the model's own forward (not back to the outer one: no endless recursion)."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    reference = _model()
    model = lorakit.speedup(copy.deepcopy(reference), bf16=False, verbose=False)
    trl_utils.add_fused_lm_head(model.get_base_model(), outputs=("log_probs",))
    batch = _padded(_examples())
    if second_call == "speedup again":
        lorakit.speedup(model, bf16=False, verbose=False)
    else:
        _fused_step(model, batch)
    lm = model.get_base_model()
    assert len(lm._lorakit_speedup.chain) == 2 and lm._lorakit_speedup.depth == 0
    reference.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits,
                                   reference(input_ids=batch["input_ids"]).logits, rtol=1e-5, atol=1e-5)
        out = model.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
        want = reference.generate(input_ids=batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(out, want)
    model.train(), reference.train()
    torch.testing.assert_close(model(**batch).loss, reference(**batch).loss, rtol=1e-5, atol=1e-6)
    assert lm._lorakit_speedup.depth == 0
