"""The same weights give the same training step in lorakit and PEFT: the same loss, the same set
of trainable parameters and the same gradient on each (copied through the adapter file, train
mode, lora_dropout=0; the tiny models have no dropout of their own)."""

import contextlib
import io

import peft
import pytest
import torch

import lorakit

from .conftest import (
    ARCHS, HARMLESS_WARNINGS, cases, load_in_peft, logits, lorakit_model, max_diff, peft_model,
    peft_parameter_name,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]

TOL = 1e-6


def assert_same_step(arch, lk, pm, seed=0):
    """One training step in each library; the RNG is re-seeded before each forward so that
    dropout, where there is any, draws the same masks when it sits where PEFT's does."""
    lk.train()
    pm.train()
    batch = arch.batch()
    torch.manual_seed(seed)
    lk_loss = lk(**batch).loss
    torch.manual_seed(seed)
    pf_loss = pm(**batch).loss
    lk_loss.backward()
    pf_loss.backward()
    assert abs(lk_loss.item() - pf_loss.item()) <= TOL

    lk_grads = {peft_parameter_name(lk, n): p.grad for n, p in lk.named_parameters() if p.requires_grad}
    pf_grads = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert sorted(set(lk_grads) - set(pf_grads)) == [], "trainable only in lorakit"
    assert sorted(set(pf_grads) - set(lk_grads)) == [], "trainable only in PEFT"
    assert any(".lora_B." in n for n in pf_grads)
    for name, grad in pf_grads.items():
        assert grad is not None and lk_grads[name] is not None, name
        assert max_diff(lk_grads[name], grad) <= TOL, name
    lora_grads = [g for n, g in pf_grads.items() if ".lora_" in n]
    assert all(g.abs().sum() > 0 for g in lora_grads), "every LoRA A and B gets a gradient"


@pytest.mark.parametrize("arch_name, variant", cases("lorakit_to_peft"))
def test_same_loss_and_gradients_lorakit_adapter_in_peft(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, variant)
    lk.save_pretrained(tmp_path)
    pm, result = load_in_peft(arch, tmp_path, is_trainable=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert_same_step(arch, lk, pm)


@pytest.mark.parametrize("arch_name, variant", cases("peft_to_lorakit"))
def test_same_loss_and_gradients_peft_adapter_in_lorakit(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    pm = peft_model(arch, variant)
    pm.save_pretrained(str(tmp_path))
    lk = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path, is_trainable=True)
    assert_same_step(arch, lk, pm)


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_lora_dropout_is_off_in_eval_mode(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, "plain", lora_dropout=0.5)
    lk.save_pretrained(tmp_path)
    pm = peft.PeftModel.from_pretrained(arch.build(), str(tmp_path))
    assert pm.peft_config["default"].lora_dropout == 0.5
    expected = logits(lk.eval(), arch)
    assert max_diff(logits(pm.eval(), arch), expected) <= TOL

    # ... and on in train mode: the output changes, and a second eval call is unchanged.
    torch.manual_seed(0)
    assert max_diff(logits(lk.train(), arch), expected) > 1e-4
    assert torch.equal(logits(lk.eval(), arch), expected)


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_lora_dropout_in_train_mode_matches_peft_with_the_same_seed(arch_name, tmp_path):
    """Dropout acts on the adapter's input, as in PEFT: with the same RNG state the masks, the
    loss and the gradients are the same (dropout placed elsewhere would draw other masks)."""
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, "plain", lora_dropout=0.5)
    lk.save_pretrained(tmp_path)
    pm, _ = load_in_peft(arch, tmp_path, is_trainable=True)
    assert_same_step(arch, lk, pm, seed=7)


@pytest.mark.parametrize("arch_name, variant", cases("counts"))
def test_same_parameter_counts_and_printout(arch_name, variant):
    arch = ARCHS[arch_name]
    lk, pm = lorakit_model(arch, variant), peft_model(arch, variant)
    assert lk.get_nb_trainable_parameters() == pm.get_nb_trainable_parameters()
    printed = []
    for model in (lk, pm):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            model.print_trainable_parameters()
        printed.append(out.getvalue())
    assert printed[0] == printed[1]
    assert printed[0].startswith("trainable params: ")
