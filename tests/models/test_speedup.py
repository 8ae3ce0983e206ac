"""`lorakit.speedup`: the trainer's fast paths on a model another training loop trains, with the
loss and adapter gradients of the plain model, through transformers' Trainer as well."""

import copy
import subprocess
import sys

import pytest
import torch
from transformers import DataCollatorWithFlattening, GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import lorakit
from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.models import speedup as speedup_module
from lorakit.models.attention import ATTENTION, LAYOUT_KEY

from core.tiny import SEVEN, tiny_llama


def _model(seed=0):
    base = tiny_llama(seed)
    # a packed batch keeps its examples apart in transformers' plain forward only without a cache
    base.config.use_cache = False
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False))


def _examples(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 100, (int(torch.randint(5, 14, (1,), generator=g)),), generator=g).tolist()
        labels = [-100] * 3 + ids[3:]  # a prompt of 3 tokens without a loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def _padded(features):
    longest = max(len(f["input_ids"]) for f in features)
    pad = [longest - len(f["input_ids"]) for f in features]
    return {"input_ids": torch.tensor([f["input_ids"] + [0] * p for f, p in zip(features, pad)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * p for f, p in zip(features, pad)]),
            "labels": torch.tensor([f["labels"] + [-100] * p for f, p in zip(features, pad)])}


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a[0], b[0], rtol=rtol, atol=atol)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=rtol, atol=atol, msg=name)


def test_lorakit_speedup_is_reachable_without_loading_the_models_layer_on_import():
    code = ("import sys, lorakit; assert 'lorakit.models' not in sys.modules and 'transformers' not in sys.modules; "
            "from lorakit.models.speedup import speedup; assert lorakit.speedup is speedup")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    with pytest.raises(AttributeError, match="no attribute 'speedups'"):
        lorakit.speedups  # noqa: B018


@pytest.mark.parametrize("layout, flash_kwargs", [("padded", False), ("packed", False), ("packed", True)],
                         ids=["padded", "packed-position_ids", "packed-cu_seq_lens"])
def test_loss_and_adapter_gradients_match_the_plain_model_in_fp32(layout, flash_kwargs, capsys):
    plain = _model()
    fast = lorakit.speedup(copy.deepcopy(plain), bf16=False)
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "lorakit.speedup (Llama family)" in line
    assert fast.get_base_model().config._attn_implementation == ATTENTION
    features = _examples()
    batch = _padded(features) if layout == "padded" else \
        DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)(features)
    _assert_same(_loss_and_grads(fast, batch), _loss_and_grads(plain, batch))


def test_a_packed_batch_is_laid_out_once_and_attended_example_by_example(monkeypatch):
    fast = lorakit.speedup(_model(), bf16=False, verbose=False)
    seen = []
    original = speedup_module._call_plain

    def spy(lm, settings, args, kwargs):
        seen.append(kwargs)
        return original(lm, settings, args, kwargs)

    monkeypatch.setattr(speedup_module, "_call_plain", spy)
    batch = DataCollatorWithFlattening()(_examples(3))
    lengths = [len(f["input_ids"]) for f in _examples(3)]
    assert speedup_module.boundaries(batch["position_ids"]).tolist() == [0, lengths[0], sum(lengths[:2]), sum(lengths)]
    fast.eval()  # without the loss head: the model's own forward, given the layout
    fast(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    assert LAYOUT_KEY in seen[0] and seen[0]["cu_seq_lens_q"].tolist()[-1] == sum(lengths)
    # not packed: no restart, a padded batch, or positions that do not start at 0
    assert speedup_module.boundaries(torch.arange(9)[None]) is None
    assert speedup_module.boundaries(torch.tensor([[0, 1, 2, 0, 1]] * 2)) is None
    assert speedup_module.boundaries(torch.tensor([[1, 2, 0, 1]])) is None


def test_with_labels_in_training_no_logits_are_made_and_without_them_the_forward_is_unchanged():
    plain = _model()
    fast = lorakit.speedup(copy.deepcopy(plain), bf16=False, verbose=False)
    batch = _padded(_examples(3))
    fast.train()
    assert fast(**batch).logits is None
    for mode in ("train", "eval"):
        getattr(fast, mode)(), getattr(plain, mode)()
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        torch.testing.assert_close(fast(**inputs).logits, plain(**inputs).logits, rtol=1e-5, atol=1e-5)
    out = fast(**batch)  # eval mode with labels: logits and loss, as the plain model (Trainer's evaluation)
    torch.testing.assert_close(out.loss, plain(**batch).loss, rtol=1e-5, atol=1e-6)
    assert out.logits is not None
    # transformers' num_items_in_batch contract: the sum divided by it
    fast.train()
    n = torch.tensor(50)
    torch.testing.assert_close(fast(**batch, num_items_in_batch=n).loss, plain(**batch, num_items_in_batch=n).loss,
                               rtol=1e-5, atol=1e-6)


def test_bf16_frozen_weights_fp32_adapters_within_bf16_rounding():
    plain = _model()
    fast = lorakit.speedup(copy.deepcopy(plain), bf16=True, verbose=False)
    assert "precision: bf16" in " ".join(fast.lorakit_speedup)
    for name, p in fast.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
    for layout in ("padded", "packed"):
        features = _examples()
        batch = _padded(features) if layout == "padded" else DataCollatorWithFlattening()(features)
        loss, grads = _loss_and_grads(fast, batch)
        want_loss, want_grads = _loss_and_grads(plain, batch)
        assert abs(float(loss) - float(want_loss)) < 0.02 * float(want_loss)
        for name, g in grads.items():
            assert g.dtype == torch.float32
            cos = torch.nn.functional.cosine_similarity(g.flatten(), want_grads[name].flatten(), dim=0)
            assert cos > 0.98, (layout, name, float(cos))


def _trainer(model, tmp_path, collate, *, steps=3, accum=2, **extra):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2,
                             gradient_accumulation_steps=accum, learning_rate=1e-2, report_to=[], use_cpu=True,
                             logging_steps=1, save_strategy="no", seed=0, dataloader_num_workers=0,
                             **extra)  # remove_unused_columns on (the default): the columns come from forward's signature
    return Trainer(model=model, args=args, train_dataset=_examples(12), data_collator=collate)


def _logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_trainer_with_gradient_accumulation_trains_as_without_the_call(layout, tmp_path, monkeypatch):
    collate = _padded if layout == "padded" else DataCollatorWithFlattening()
    plain, fast = _model(), lorakit.speedup(_model(), bf16=False, verbose=False)
    divisors = []
    original = speedup_module.mean_label_loss
    monkeypatch.setattr(speedup_module, "mean_label_loss", lambda *a: divisors.append(a[-1]) or original(*a))
    runs = []
    for name, model in (("plain", plain), ("fast", fast)):
        trainer = _trainer(model, tmp_path / name, collate)
        trainer.train()
        runs.append(_logged_losses(trainer))
    assert len(runs[0]) == 3
    # the fast head ran every micro-batch, divided by the label tokens of the whole step (the Trainer's count)
    assert len(divisors) == 3 * 2 and all(torch.is_tensor(d) for d in divisors)
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-4, atol=1e-5)
    for (n, a), (_, b) in zip(plain.named_parameters(), fast.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=n)


def test_a_trainer_run_saves_an_adapter_peft_loads_with_identical_outputs(tmp_path):
    peft = pytest.importorskip("peft")
    fast = lorakit.speedup(_model(), bf16=True, gradient_checkpointing=True, verbose=False)
    _trainer(fast, tmp_path / "run", _padded, steps=2).train()
    fast.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert saved and all(t.dtype == torch.float32 for t in saved.values())
    assert all("lora_" in name for name in saved)  # the adapter only: frozen weights are not saved
    ids = _padded(_examples(2))["input_ids"]
    theirs = peft.PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).eval()
    ours = PeftModel.from_pretrained(tiny_llama(0), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    trained = {n.replace(".default", ""): p for n, p in fast.named_parameters() if p.requires_grad}
    assert len(trained) == len(saved)


def test_trainer_gradient_checkpointing_matches_the_plain_run(tmp_path):
    plain, fast = _model(), lorakit.speedup(_model(), bf16=False, verbose=False)
    losses = []
    for name, model in (("plain", plain), ("fast", fast)):
        trainer = _trainer(model, tmp_path / name, DataCollatorWithFlattening(), steps=2,
                           gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.train()
        losses.append(_logged_losses(trainer))
    assert fast.get_base_model().is_gradient_checkpointing
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), rtol=1e-4, atol=1e-5)


def test_a_compiled_model_takes_the_same_step():
    """torch.compile over the whole model (the Trainer's ``torch_compile``; eager backend: no C++ build)."""
    torch._dynamo.reset()
    plain = _model()
    fast = lorakit.speedup(copy.deepcopy(plain), bf16=False, verbose=False)
    compiled = torch.compile(fast, backend="eager")
    batch = DataCollatorWithFlattening()(_examples(4))
    want = _loss_and_grads(plain, batch)
    fast.train()
    fast.zero_grad(set_to_none=True)
    loss = compiled(**batch).loss
    loss.backward()
    _assert_same((loss.detach(), {n: p.grad for n, p in fast.named_parameters() if p.requires_grad}), want)


def test_an_unsupported_architecture_falls_back_with_one_line_and_still_trains(tmp_path, capsys):
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64, resid_pdrop=0.0,
                                 embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    model = get_peft_model(gpt2, LoraConfig(r=4, target_modules=["c_attn"], init_lora_weights=False))
    plain = copy.deepcopy(model)
    fast = lorakit.speedup(model, bf16=False)
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "gpt2: not Llama-family" in out[0] and "loss head: the model's own" in out[0]
    assert fast is model and "forward" not in vars(fast.get_base_model())  # the plain path, untouched
    batch = _padded(_examples(4))
    _assert_same(_loss_and_grads(fast, batch), _loss_and_grads(plain, batch))
    trainer = _trainer(fast, tmp_path, _padded, steps=2)
    trainer.train()
    assert len(_logged_losses(trainer)) == 2


def test_speedup_refuses_what_is_not_a_transformers_model():
    with pytest.raises(lorakit.ConfigError, match="expected a transformers model"):
        lorakit.speedup(torch.nn.Linear(2, 2))


def test_a_second_call_changes_nothing_and_a_deep_copy_runs_on_its_own_weights():
    plain = _model()
    fast = lorakit.speedup(lorakit.speedup(copy.deepcopy(plain), bf16=False, verbose=False), bf16=False,
                           verbose=False)
    assert fast.get_base_model()._lorakit_speedup.wrapped is None  # not wrapped around itself
    batch = DataCollatorWithFlattening()(_examples())
    _assert_same(_loss_and_grads(fast, batch), _loss_and_grads(plain, batch))
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        for p in twin.parameters():
            if p.requires_grad:
                p.mul_(2)
    assert not torch.equal(_loss_and_grads(twin, batch)[0], _loss_and_grads(fast, batch)[0])
