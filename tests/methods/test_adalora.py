"""AdaLoRA against PEFT on the same tiny Llama: weights from the same seed, forward, gradients,
the allocator's budget and masks step by step, files both ways (before and after allocation),
merge, and the config's checks."""

import dataclasses
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from core.tiny import input_ids, tiny_llama
from lorakit.errors import ConfigError, LorakitError
from lorakit.methods.adalora import AdaLoraConfig, budget_schedule

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

SCHEDULE = dict(task_type="CAUSAL_LM", init_r=6, target_r=2, total_step=10, tinit=1, tfinal=2,
                target_modules=["q_proj", "v_proj"], lora_alpha=8)


def _pair(**overrides):
    """(PEFT model, lorakit model) on two bitwise-equal base models, same seed before injection."""
    kw = {**SCHEDULE, **overrides}
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**kw))
    ours = lorakit.get_peft_model(tiny_llama(), AdaLoraConfig(**kw))
    return theirs, ours


def _params(model, ours: bool):
    strip = ".adapters.default" if ours else ".default"
    return {n.replace(strip, ""): p for n, p in model.named_parameters() if p.requires_grad}


def _train_both(theirs, ours, steps: int, start: int = 0):
    """SGD on identical batches; update_and_allocate after step, before zero_grad (PEFT's order)."""
    tp, op = _params(theirs, False), _params(ours, True)
    assert sorted(tp) == sorted(op)
    opt_t = torch.optim.SGD(list(tp.values()), lr=0.5)
    opt_o = torch.optim.SGD(list(op.values()), lr=0.5)
    theirs.train(), ours.train()
    for step in range(start, start + steps):
        ids = input_ids(seed=step)
        loss_t, loss_o = theirs(input_ids=ids, labels=ids).loss, ours(input_ids=ids, labels=ids).loss
        assert abs(loss_t.item() - loss_o.item()) <= 1e-6
        loss_t.backward(), loss_o.backward()
        for k in tp:
            torch.testing.assert_close(op[k].grad, tp[k].grad, rtol=0, atol=1e-6)
        opt_t.step(), opt_o.step()
        theirs.base_model.update_and_allocate(step)
        ours.base_model.update_and_allocate(step)
        opt_t.zero_grad(), opt_o.zero_grad()
    theirs.eval(), ours.eval()
    return tp, op


def _peft_pattern(theirs):
    pattern = theirs.peft_config["default"].rank_pattern
    return None if pattern is None else {k.replace(".default", ""): v for k, v in pattern.items()}


def test_same_seed_gives_the_same_weights_and_the_forward_matches_peft():
    theirs, ours = _pair(init_lora_weights=False)  # random E: a non-zero update
    tp, op = _params(theirs, False), _params(ours, True)
    for k in tp:
        assert torch.equal(tp[k], op[k]), k
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_the_forward_is_the_svd_formula():
    _, ours = _pair(init_lora_weights=False)
    layer = ours.get_base_model().model.layers[0].self_attn.q_proj
    a = layer.adapters["default"]
    x = torch.randn(3, 32)
    expected = x @ layer.base_layer.weight.T + (x @ (a.lora_A * a.lora_E).T @ a.lora_B.T) * 8 / (6 + 1e-5)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    assert a.lora_E.requires_grad and a.lora_A.requires_grad and not layer.base_layer.weight.requires_grad


def test_training_and_allocation_match_peft_step_by_step():
    theirs, ours = _pair()
    tp, op = _train_both(theirs, ours, steps=10)
    for k in tp:
        torch.testing.assert_close(op[k], tp[k], rtol=0, atol=1e-6)
    pattern = ours.peft_config["default"].rank_pattern
    assert pattern == _peft_pattern(theirs)
    kept = sum(sum(v) for v in pattern.values())
    assert kept == SCHEDULE["target_r"] * 4  # the budget fell to target_r per matrix on average
    for key, keep in pattern.items():  # the final mask is re-applied after T - tfinal
        e = op["base_model.model." + key]
        assert torch.all(e[~torch.tensor(keep)] == 0)


def test_masks_agree_with_peft_at_every_reallocation():
    theirs, ours = _pair(total_step=12, tinit=2, tfinal=3, deltaT=2)
    patterns, start = [], 0
    for steps in (5, 2, 2, 2):  # masks at steps 4, 6, 8; the final one at 9, re-applied at 10
        _train_both(theirs, ours, steps, start)
        start += steps
        patterns.append(ours.peft_config["default"].rank_pattern)
        assert patterns[-1] == _peft_pattern(theirs)
    kept = [sum(sum(v) for v in p.values()) for p in patterns]
    assert kept == [13, 9, 8, 8]  # budget(4), budget(6), budget(8), the final target_r * 4 layers


@pytest.mark.parametrize("sched", [dict(tinit=0, tfinal=0, total_step=7, deltaT=1),
                                   dict(tinit=3, tfinal=5, total_step=40, deltaT=4),
                                   dict(tinit=10, tfinal=10, total_step=100, deltaT=3)])
def test_the_budget_follows_peft_schedule(sched):
    theirs, _ = _pair(**sched)
    allocator = theirs.base_model.rankallocator
    for step in range(sched["total_step"] + 3):
        ours = budget_schedule(step, init_bgt=allocator.init_bgt, target_bgt=allocator.target_bgt,
                               tinit=sched["tinit"], tfinal=sched["tfinal"], total_step=sched["total_step"],
                               deltaT=sched["deltaT"])
        assert ours == allocator.budget_schedule(step), step
    budgets = [budget_schedule(s, init_bgt=24, target_bgt=8, **sched)[0] for s in range(sched["total_step"] + 1)]
    assert budgets[0] == 24 and budgets[-1] == 8 and budgets == sorted(budgets, reverse=True)


def _loads_cleanly(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fn()
    bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    assert not bad, bad
    return model


@pytest.mark.parametrize("steps", [0, 6, 10])  # untrained; mid-budget masks; after the final allocation
def test_files_load_both_ways_with_identical_outputs(tmp_path, steps):
    theirs, ours = _pair(init_lora_weights=steps != 0)
    if steps:
        _train_both(theirs, ours, steps)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    ids = input_ids(seed=99)
    with torch.no_grad():
        reference = ours(input_ids=ids).logits
    # the two files are the same: keys, shapes, values and the rank_pattern
    a, b = load_file(tmp_path / "ours" / "adapter_model.safetensors"), load_file(tmp_path / "theirs" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs"))
    assert ca["peft_type"] == "ADALORA" and ca["rank_pattern"] == cb["rank_pattern"]
    assert sorted(ca["target_modules"]) == sorted(cb["target_modules"])
    skip = ("auto_mapping", "peft_version", "target_modules")
    assert {k: v for k, v in ca.items() if k not in skip} == {k: v for k, v in cb.items() if k not in skip}
    # lorakit's file in PEFT, PEFT's file in lorakit
    in_peft = _loads_cleanly(lambda: peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "ours")))
    in_ours = _loads_cleanly(lambda: lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "theirs"))
    with torch.no_grad():
        torch.testing.assert_close(in_peft(input_ids=ids).logits, reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(in_ours(input_ids=ids).logits, reference, rtol=0, atol=1e-6)
    assert isinstance(in_ours.peft_config["default"], AdaLoraConfig)
    if steps == 10:  # layers are sized by the rank_pattern
        q0 = in_ours.get_base_model().model.layers[0].self_attn.v_proj.adapters["default"]
        assert q0.lora_A.shape[0] == sum(ca["rank_pattern"]["model.layers.0.self_attn.v_proj.lora_E"])


def test_merge_equals_unmerged_and_merge_and_unload(tmp_path):
    theirs, ours = _pair()
    _train_both(theirs, ours, 10)
    ids = input_ids(seed=7)
    with torch.no_grad():
        before = ours(input_ids=ids).logits
        ours.merge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=1e-5)
        ours.unmerge_adapter()
        torch.testing.assert_close(ours(input_ids=ids).logits, before, rtol=0, atol=1e-6)
        with ours.disable_adapter():
            torch.testing.assert_close(ours(input_ids=ids).logits, tiny_llama()(input_ids=ids).logits)
        merged = ours.merge_and_unload()
        torch.testing.assert_close(merged(input_ids=ids).logits, theirs.merge_and_unload()(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)


def test_the_regulariser_is_added_to_the_loss_as_peft_adds_it():
    theirs, ours = _pair(init_lora_weights=False, orth_reg_weight=0.3)
    ids = input_ids()
    plain = ours.get_base_model()(input_ids=ids, labels=ids).loss
    with_reg = ours(input_ids=ids, labels=ids).loss
    by_hand = 0.0
    for _, a in lorakit.methods.adalora.layer.svd_adapters(ours.get_base_model(), "default"):
        by_hand += torch.linalg.matrix_norm(a.lora_A @ a.lora_A.T - torch.eye(6))
        by_hand += torch.linalg.matrix_norm(a.lora_B.T @ a.lora_B - torch.eye(6))
    torch.testing.assert_close(with_reg - plain, 0.3 * by_hand / 8)
    torch.testing.assert_close(ours.base_model.orthogonal_loss(), 0.3 * by_hand / 8)
    torch.testing.assert_close(with_reg, theirs(input_ids=ids, labels=ids).loss, rtol=0, atol=1e-6)


def test_config_fields_and_defaults_are_peft_ones(tmp_path):
    ours = {f.name: f.default for f in dataclasses.fields(AdaLoraConfig)}
    theirs = {f.name: f.default for f in dataclasses.fields(peft.AdaLoraConfig)}
    for name in ("target_r", "init_r", "tinit", "tfinal", "deltaT", "beta1", "beta2", "orth_reg_weight",
                 "total_step", "rank_pattern", "lora_alpha", "lora_dropout"):
        assert ours[name] == theirs[name], name
    config = AdaLoraConfig(total_step=5)
    config.save_pretrained(tmp_path)
    loaded = lorakit.LoraConfig.from_pretrained(tmp_path)  # the peft_type picks the class
    assert type(loaded) is AdaLoraConfig and loaded == config
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ADALORA"


@pytest.mark.parametrize("kwargs, field", [
    (dict(), "total_step"),
    (dict(total_step=10, tinit=5, tfinal=5), "tinit"),
    (dict(total_step=10, target_r=16, init_r=12), "target_r"),
    (dict(total_step=10, beta1=1.0), "beta1"),
    (dict(total_step=10, orth_reg_weight=-1.0), "orth_reg_weight"),
    (dict(total_step=10, deltaT=0), "deltaT"),
    (dict(total_step=10, rank_pattern={"model.q_proj.lora_E": [1, 0]}), "rank_pattern"),
    (dict(total_step=10, use_dora=True), "use_dora"),
])
def test_bad_configs_are_refused_by_name(kwargs, field):
    with pytest.raises(ConfigError, match=field):
        AdaLoraConfig(**kwargs)


def test_refusals_on_the_model():
    with pytest.raises(ConfigError, match="Linear and Conv1D"):
        lorakit.get_peft_model(tiny_llama(), AdaLoraConfig(total_step=5, target_modules=["embed_tokens"]))
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="ADALORA adapter needs a model of its own"):
        model.add_adapter("ada", AdaLoraConfig(total_step=5, target_modules=["q_proj"]))
    _, ours = _pair()
    with pytest.raises(ConfigError, match="one adapter at a time"):
        ours.add_adapter("second", AdaLoraConfig(**SCHEDULE))
    ours.add_adapter("frozen", AdaLoraConfig(**SCHEDULE, inference_mode=True))  # a frozen one is fine
    with pytest.raises(LorakitError, match="after loss.backward"):
        ours.base_model.update_and_allocate(3)  # no gradients yet
