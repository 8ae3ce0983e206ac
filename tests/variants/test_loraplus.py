"""LoRA+: the same parameter groups as PEFT's create_loraplus_optimizer, and B really moves at
ratio x the learning rate."""

import re

import peft
import pytest
import torch
from peft.optimizers import create_loraplus_optimizer as peft_create_loraplus_optimizer

import lorakit
from interop.conftest import SEVEN, tiny_bert, tiny_llama
from lorakit.errors import ConfigError
from lorakit.layer import LoraLayer
from lorakit.variants.loraplus import create_loraplus_optimizer, loraplus_param_groups

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

# name -> (base builder, LoraConfig arguments shared by both libraries)
CASES = {
    # embedding adapter (its own group), q/k/v/o biases trained (1-d: B, no decay), RMSNorm (not
    # LayerNorm: decayed) saved in full, lm_head saved in full (a matrix: A's group)
    "llama": (lambda: tiny_llama(attention_bias=True),
              dict(r=4, lora_alpha=8, target_modules=SEVEN + ["embed_tokens"], bias="all",
                   modules_to_save=["lm_head", "model.norm"], task_type="CAUSAL_LM")),
    # LayerNorm weights saved in full (B, no decay), every bias trained, a classifier head
    "bert": (tiny_bert,
             dict(r=4, lora_alpha=8, target_modules=["query", "value"], bias="all", task_type="SEQ_CLS",
                  modules_to_save=["classifier", "output.LayerNorm"])),
}


def both_models(case):
    build, kwargs = CASES[case]
    ours = lorakit.get_peft_model(build(), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    theirs = peft.get_peft_model(build(), peft.LoraConfig(init_lora_weights=False, **kwargs))
    return ours, theirs


def peft_name(model, name):
    """lorakit's parameter name as PEFT spells it (only the adapter's A and B differ)."""
    m = re.fullmatch(r"(.*)\.adapters\.(\w+)\.lora_([AB])", name)
    if not m:
        return name
    layer, adapter, factor = m.groups()
    module = model.get_submodule(layer)
    assert isinstance(module, LoraLayer)
    if module.is_embedding:
        return f"{layer}.lora_embedding_{factor}.{adapter}"
    return f"{layer}.lora_{factor}.{adapter}.weight"


def described(model, optimizer, rename=lambda n: n):
    names = {id(p): rename(n) for n, p in model.named_parameters()}
    return [(sorted(names[id(p)] for p in g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_groups_are_peft_s(case):
    ours, theirs = both_models(case)
    kwargs = dict(lr=2e-3, loraplus_lr_ratio=16, loraplus_weight_decay=0.05, loraplus_lr_embedding=3e-5,
                  betas=(0.8, 0.95), eps=1e-7)
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, **dict(kwargs))
    reference = peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, **dict(kwargs))
    got = described(ours, mine, lambda n: peft_name(ours, n))
    want = described(theirs, reference)
    assert got == want
    # every group of the table is exercised by one case or the other
    sizes = [len(g[0]) for g in got]
    assert sizes[0] and sizes[2] and sizes[3]
    assert (case == "llama") == bool(sizes[1])
    assert sum(sizes) == sum(p.requires_grad for p in ours.parameters())
    for key in ("betas", "eps", "lr"):  # the rest of kwargs reached the optimizer
        assert mine.defaults[key] == reference.defaults[key]


def test_peft_s_defaults_weight_decay_0_embedding_lr_1e_6():
    ours, theirs = both_models("llama")
    mine = create_loraplus_optimizer(ours, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4, weight_decay=0.1)
    reference = peft_create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=4,
                                               weight_decay=0.1)
    assert described(ours, mine, lambda n: peft_name(ours, n)) == described(theirs, reference)
    assert [g["lr"] for g in mine.param_groups] == [1e-3, 1e-6, 4e-3, 4e-3]
    assert [g["weight_decay"] for g in mine.param_groups] == [0.0, 0.0, 0.0, 0.0]  # groups override weight_decay


def test_one_sgd_step_moves_b_at_ratio_times_the_learning_rate():
    build, kwargs = CASES["llama"]
    torch.manual_seed(0)
    model = lorakit.get_peft_model(build(), lorakit.LoraConfig(init_lora_weights=False, **kwargs))
    lr, ratio, decay = 0.1, 16.0, 0.01
    optimizer = create_loraplus_optimizer(model, torch.optim.SGD, lr=lr, loraplus_lr_ratio=ratio,
                                          loraplus_weight_decay=decay)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: (p.detach().clone(), p.grad.clone()) for n, p in model.named_parameters() if p.requires_grad}
    optimizer.step()

    checked = {"A": 0, "B": 0, "embedding": 0, "bias": 0}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        w, g = before[name]
        layer = name.rsplit(".adapters.", 1)[0]
        embedding = ".adapters." in name and model.get_submodule(layer).is_embedding
        if embedding:  # SGD: w <- w - lr_group * (g + decay * w)
            want, kind = w - 1e-6 * (g + decay * w), "embedding"
        elif name.endswith("bias"):
            want, kind = w - lr * ratio * g, "bias"  # B's group without weight decay
        elif name.endswith("lora_B") or p.ndim == 1:
            want, kind = w - lr * ratio * (g + decay * w), "B"
        else:
            want, kind = w - lr * (g + decay * w), "A"
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=1e-7)
        checked[kind] += 1
        if kind == "B" and name.endswith("lora_B"):  # B's actual step is ratio x A's rule
            assert torch.allclose(w - p.detach(), lr * ratio * (g + decay * w), atol=1e-7)
    assert all(checked.values()), checked


def test_loraplus_on_a_dora_or_plain_model_keeps_every_trainable_parameter_once():
    build, kwargs = CASES["bert"]
    model = lorakit.get_peft_model(build(), lorakit.LoraConfig(**kwargs))
    groups = loraplus_param_groups(model, lr=1e-3, loraplus_lr_ratio=8)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == sum(p.requires_grad for p in model.parameters())
    assert [g["name"] for g in groups] == ["A", "embedding", "B", "B_no_decay"]


@pytest.mark.parametrize("bad", [0, -2.0, float("nan"), float("inf"), "16", True, None])
def test_a_ratio_that_is_not_a_positive_number_is_refused(bad):
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="loraplus_lr_ratio=.*positive number"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=bad)


def test_a_negative_weight_decay_or_embedding_lr_is_refused():
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="loraplus_weight_decay"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_weight_decay=-1)
    with pytest.raises(ConfigError, match="loraplus_lr_embedding"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, loraplus_lr_embedding=0)


def test_public_imports_match_peft_paths():
    import lorakit
    from lorakit.optimizers import create_loraplus_optimizer as from_optimizers

    assert lorakit.create_loraplus_optimizer is from_optimizers
    assert lorakit.AdaLoraConfig(total_step=10).peft_type == "ADALORA"
    assert {"AdaLoraConfig", "create_loraplus_optimizer"} <= set(lorakit.__all__)
