"""add_weighted_adapter: each combination against the update computed by hand from the inputs,
against PEFT where PEFT is right, and where PEFT is wrong (rsLoRA, "linear" on identical
adapters) against the exact answer, with PEFT's error shown beside it."""

from __future__ import annotations

import peft
import pytest
import torch

import lorakit
from lorakit.errors import ConfigError
from lorakit.inject import lora_layers
from lorakit.variants.weighted import Part, combine_linear

from interop.conftest import HARMLESS_WARNINGS, one_thread, tiny_llama  # noqa: F401 (autouse fixture)

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]

IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(123))
TOL = 1e-6


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to max |want|."""
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def two_adapters(rslora_a: bool = False, rslora_b: bool = False, r_b: int = 2,
                 alpha_pattern: dict | None = None) -> lorakit.PeftModel:
    """"a": r 4 on q, v and the embedding; "b": rank r_b on v and the embedding (so q has "a"
    only). Random A and B (init_lora_weights=False), other alphas, optionally rsLoRA."""
    torch.manual_seed(1)
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(
        r=4, lora_alpha=8, use_rslora=rslora_a, target_modules=["q_proj", "v_proj", "embed_tokens"],
        alpha_pattern=alpha_pattern or {}, init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", lorakit.LoraConfig(r=r_b, lora_alpha=3, use_rslora=rslora_b,
                                              target_modules=["v_proj", "embed_tokens"],
                                              init_lora_weights=False))
    return model.eval()


def exact_updates(model, adapters, weights) -> dict[str, torch.Tensor]:
    """sum_i w_i s_i B_i A_i per layer, by hand from the inputs' factors, in float64."""
    out = {}
    for name, layer in lora_layers(model.get_base_model()):
        terms = [w * layer.adapters[a].scaling * (layer.adapters[a].lora_B.double() @ layer.adapters[a].lora_A.double())
                 for a, w in zip(adapters, weights) if a in layer.adapters]
        if terms:
            out[name] = sum(terms)  # (out, in)
    return out


def new_updates(model, name) -> dict[str, torch.Tensor]:
    return {n: layer.adapters[name].delta_weight() for n, layer in lora_layers(model.get_base_model())
            if name in layer.adapters}


def logits_with(model, adapter) -> torch.Tensor:
    model.set_adapter(adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def reference_logits(updates: dict[str, torch.Tensor]) -> torch.Tensor:
    """The base model with the updates added to its weights by plain PyTorch."""
    base = tiny_llama()
    with torch.no_grad():
        for name, delta in updates.items():
            weight = base.get_submodule(name).weight
            weight += (delta.T if name.endswith("embed_tokens") else delta).to(weight.dtype)
        return base(input_ids=IDS).logits


def assert_exact(model, name, want: dict[str, torch.Tensor]):
    got = new_updates(model, name)
    assert sorted(got) == sorted(want)
    for layer, delta in want.items():
        assert rel(got[layer], delta) <= TOL, layer
    assert rel(logits_with(model, name), reference_logits(want)) <= TOL


# --------------------------------------------------------------------------- exactness

@pytest.mark.parametrize("rslora_a, rslora_b", [(False, False), (True, False), (False, True), (True, True)])
def test_cat_is_the_exact_weighted_sum(rslora_a, rslora_b):
    model = two_adapters(rslora_a, rslora_b)
    weights = [0.7, -1.3]
    model.add_weighted_adapter(["a", "b"], weights, "cat", combination_type="cat")
    config = model.peft_config["cat"]
    assert (config.r, config.lora_alpha, config.use_rslora) == (6, 6, rslora_a)
    assert config.target_modules == {"q_proj", "v_proj", "embed_tokens"}
    assert_exact(model, "cat", exact_updates(model, ["a", "b"], weights))


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("rank", [6, 20])  # 20: above v_proj's min(out, in) = 16, zero-padded
def test_svd_at_full_rank_is_exact(rslora, rank):
    model = two_adapters(rslora, not rslora)
    weights = [-0.4, 2.0]
    model.add_weighted_adapter(["a", "b"], weights, "svd", combination_type="svd", svd_rank=rank)
    assert model.peft_config["svd"].r == rank
    assert_exact(model, "svd", exact_updates(model, ["a", "b"], weights))


def test_svd_truncated_is_the_truncated_svd_of_the_exact_update():
    model = two_adapters(rslora_a=True)
    weights = [1.5, -0.5]
    model.add_weighted_adapter(["a", "b"], weights, "svd")  # default: svd, rank max(4, 2)
    assert model.peft_config["svd"].r == 4
    want = {}
    for layer, delta in exact_updates(model, ["a", "b"], weights).items():
        U, S, Vh = torch.linalg.svd(delta)
        want[layer] = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
        assert rel(want[layer], delta) > 1e-3 or layer.endswith("q_proj")  # truncation bites
    assert_exact(model, "svd", want)


def test_svd_clamp_clamps_both_factors_at_the_quantile():
    model = two_adapters(rslora_a=True)
    weights = [0.7, -1.3]
    model.add_weighted_adapter(["a", "b"], weights, "svd", svd_rank=3, svd_clamp=0.8)
    want = {}
    for layer, delta in exact_updates(model, ["a", "b"], weights).items():
        U, S, Vh = torch.linalg.svd(delta)
        B, A = U[:, :3] @ torch.diag(S[:3]), Vh[:3]
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), 0.8)
        want[layer] = B.clamp(-hi, hi) @ A.clamp(-hi, hi)
    assert_exact(model, "svd", want)


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("weight", [0.6, -0.6, -2.5])
def test_linear_of_one_adapter_is_weight_times_its_update(rslora, weight):
    model = two_adapters(rslora_a=rslora)
    model.add_weighted_adapter(["a"], [weight], "one", combination_type="linear")
    assert model.peft_config["one"].r == 4
    assert_exact(model, "one", exact_updates(model, ["a"], [weight]))


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.8, -0.3], [-1.0, -2.0], [0.2, -0.7]])
def test_linear_of_identical_adapters_is_exact(weights):
    model = two_adapters(rslora_a=True, rslora_b=True, r_b=4)
    with torch.no_grad():
        for _, layer in lora_layers(model.get_base_model()):
            if "b" in layer.adapters:
                layer.adapters["b"].lora_A.copy_(layer.adapters["a"].lora_A)
                layer.adapters["b"].lora_B.copy_(layer.adapters["a"].lora_B)
                layer.adapters["b"].scaling = layer.adapters["a"].scaling
    model.add_weighted_adapter(["a", "b"], weights, "lin", combination_type="linear")
    assert_exact(model, "lin", exact_updates(model, ["a", "b"], weights))


def test_linear_of_different_adapters_is_total_weight_times_the_mean_factors():
    model = two_adapters(r_b=4)
    weights = [0.9, -0.4]
    model.add_weighted_adapter(["a", "b"], weights, "lin", combination_type="linear")
    want = {}
    for name, layer in lora_layers(model.get_base_model()):
        ts = [w * layer.adapters[a].scaling for a, w in zip(["a", "b"], weights) if a in layer.adapters]
        As = [layer.adapters[a].lora_A.double() for a in ["a", "b"] if a in layer.adapters]
        Bs = [layer.adapters[a].lora_B.double() for a in ["a", "b"] if a in layer.adapters]
        total = sum(ts)
        a_bar = sum(t / total * A for t, A in zip(ts, As))
        b_bar = sum(t / total * B for t, B in zip(ts, Bs))
        want[name] = total * b_bar @ a_bar
    assert_exact(model, "lin", want)


def test_combine_linear_needs_a_nonzero_total_weight():
    A, B = torch.randn(2, 5), torch.randn(3, 2)
    with pytest.raises(ConfigError, match="sum to 0"):
        combine_linear([Part(A, B, 1.0), Part(A, B, -1.0)], 2, 1.0)


def test_new_adapter_is_frozen_inactive_and_trains_once_set():
    model = two_adapters()
    model.set_adapter("a")
    model.add_weighted_adapter(["a", "b"], [1.0, 1.0], "cat", combination_type="cat")
    assert model.active_adapters == ["a"]
    new = [p for n, p in model.named_parameters() if ".cat." in n]
    assert new and not any(p.requires_grad for p in new)
    model.set_adapter("cat")
    assert all(p.requires_grad for p in new)


def test_inputs_on_different_layers_give_an_adapter_on_exactly_those_layers():
    torch.manual_seed(3)
    model = lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(
        r=2, target_modules=["q_proj"], layers_to_transform=[0], init_lora_weights=False), "a")
    model.add_adapter("b", lorakit.LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=[1],
                                              init_lora_weights=False))
    model.add_weighted_adapter(["a", "b"], [1.0, 0.5], "cat", combination_type="cat")
    assert sorted(new_updates(model, "cat")) == ["model.layers.0.self_attn.q_proj",
                                                 "model.layers.1.self_attn.v_proj"]
    assert_exact(model, "cat", exact_updates(model, ["a", "b"], [1.0, 0.5]))


# --------------------------------------------------------------------------- PEFT

def in_peft(model: lorakit.PeftModel, tmp_path) -> peft.PeftModel:
    """The same adapters "a" and "b", saved by lorakit and loaded in PEFT."""
    model.save_pretrained(tmp_path / "inputs")
    pm = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "inputs" / "a"), adapter_name="a")
    pm.load_adapter(str(tmp_path / "inputs" / "b"), "b")
    return pm.eval()


def peft_updates(pm, name) -> dict[str, torch.Tensor]:
    out = {}
    for module_name, module in pm.base_model.model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.scaling:
            delta = module.get_delta_weight(name)
            out[module_name] = delta.T if isinstance(module, peft.tuners.lora.Embedding) else delta
    return out


PEFT_RIGHT = [  # plain LoRA, positive weights: PEFT's answer is the exact one
    dict(adapters=["a", "b"], weights=[0.7, 1.3], combination_type="cat"),
    dict(adapters=["a", "b"], weights=[0.7, 1.3], combination_type="svd", svd_rank=6),
    dict(adapters=["a", "b"], weights=[0.7, 1.3], combination_type="svd", svd_rank=3),
    dict(adapters=["a", "b"], weights=[0.7, 1.3], combination_type="svd", svd_rank=3, svd_clamp=0.9),
    dict(adapters=["a"], weights=[0.7], combination_type="linear"),
    dict(adapters=["a"], weights=[-0.7], combination_type="linear"),
]


@pytest.mark.parametrize("kwargs", PEFT_RIGHT, ids=lambda k: f"{k['combination_type']}-{k.get('svd_rank')}-"
                                                         f"{k.get('svd_clamp')}-{k['weights'][0]}")
def test_same_as_peft_where_peft_is_right(kwargs, tmp_path):
    model = two_adapters()
    pm = in_peft(model, tmp_path)
    model.add_weighted_adapter(adapter_name="new", **kwargs)
    pm.add_weighted_adapter(adapter_name="new", **kwargs)
    # PEFT runs the SVD in fp32 (about 1e-6 off the exact update, which lorakit is checked
    # against above at 1e-6); cat and linear are the same arithmetic in both.
    # A clamp threshold is a quantile of those factors, so it moves by as much again on the
    # values it clamps (the rule itself is checked in float64 by hand below).
    tol = {None: 1e-5, 0.9: 1e-4}[kwargs.get("svd_clamp")] if kwargs["combination_type"] == "svd" else TOL
    ours, theirs = new_updates(model, "new"), peft_updates(pm, "new")
    assert sorted(ours) == sorted(theirs)
    for layer in ours:
        assert rel(ours[layer], theirs[layer]) <= tol, layer
    pm.set_adapter("new")
    with torch.no_grad():
        assert rel(logits_with(model, "new"), pm(input_ids=IDS).logits) <= tol
    assert model.peft_config["new"].r == pm.peft_config["new"].r


def test_where_peft_is_wrong_rslora(tmp_path):
    """PEFT leaves the new adapter's rsLoRA scale sqrt(R) in: its "cat" is sqrt(6) times the sum."""
    model = two_adapters(rslora_a=True)
    pm = in_peft(model, tmp_path)
    kwargs = dict(adapters=["a", "b"], weights=[0.7, 1.3], adapter_name="cat", combination_type="cat")
    model.add_weighted_adapter(**kwargs)
    pm.add_weighted_adapter(**kwargs)
    want = exact_updates(model, ["a", "b"], [0.7, 1.3])
    assert_exact(model, "cat", want)
    theirs = peft_updates(pm, "cat")
    for layer in want:
        assert rel(theirs[layer], want[layer]) > 1.0  # PEFT: sqrt(6) * exact


def test_where_peft_is_wrong_linear_on_identical_adapters(tmp_path):
    """Two copies of one adapter at weights [0.5, 0.5] are that adapter; PEFT's sqrt split gives
    (sqrt(.5) + sqrt(.5))^2 = 2 times it."""
    model = two_adapters(r_b=4)
    with torch.no_grad():
        for _, layer in lora_layers(model.get_base_model()):
            if "b" in layer.adapters:
                layer.adapters["a"].lora_A.copy_(layer.adapters["b"].lora_A)
                layer.adapters["a"].lora_B.copy_(layer.adapters["b"].lora_B)
    model.peft_config["a"].lora_alpha = 3  # the same scaling as "b" once saved
    for _, layer in lora_layers(model.get_base_model()):
        if "a" in layer.adapters:
            layer.adapters["a"].scaling = 3 / 4
    pm = in_peft(model, tmp_path)
    kwargs = dict(adapters=["a", "b"], weights=[0.5, 0.5], adapter_name="lin", combination_type="linear")
    model.add_weighted_adapter(**kwargs)
    pm.add_weighted_adapter(**kwargs)
    one = exact_updates(model, ["b"], [1.0])
    want = exact_updates(model, ["a", "b"], [0.5, 0.5])
    assert all(rel(want[n], one[n]) <= TOL for n in one)  # the inputs are identical where both are
    assert_exact(model, "lin", {n: want[n] for n in want})
    theirs = peft_updates(pm, "lin")
    assert rel(theirs["model.layers.0.self_attn.v_proj"], 2 * one["model.layers.0.self_attn.v_proj"]) <= TOL


@pytest.mark.parametrize("combination_type, extra", [("cat", {}), ("svd", {"svd_rank": 5}), ("linear", {})])
def test_new_adapter_saves_and_loads_in_lorakit_and_peft(combination_type, extra, tmp_path):
    model = two_adapters(rslora_a=True, r_b=4 if combination_type == "linear" else 2)
    model.add_weighted_adapter(["a", "b"], [0.6, -1.1], "new", combination_type=combination_type, **extra)
    expected = logits_with(model, "new")
    model.save_pretrained(tmp_path, selected_adapters=["new"])

    back = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "new")
    with torch.no_grad():
        assert rel(back(input_ids=IDS).logits, expected) <= TOL

    config = peft.LoraConfig.from_pretrained(str(tmp_path / "new"))
    pm = peft.get_peft_model(tiny_llama(), config)
    result = pm.load_adapter(str(tmp_path / "new"), "default")
    assert result.missing_keys == [] and result.unexpected_keys == []
    with torch.no_grad():
        assert rel(pm.eval()(input_ids=IDS).logits, expected) <= TOL


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, message", [
    (dict(adapters=["a", "nope"], weights=[1, 1]), r"adapters \['nope'\] do not exist"),
    (dict(adapters=["a", "b"], weights=[1.0]), "got 1 weights for 2 adapters"),
    (dict(adapters=["a", "b"], weights=[1.0, float("nan")]), "finite"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="ties", density=0.5),
     r"'ties': PEFT's pruning and DARE merges are not available.*'cat', 'linear', 'svd'"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="dare_linear"), "not available"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="magnitude_prune_svd"), "not available"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="sum"), "unknown combination type"),
    (dict(adapters=["a", "b"], weights=[1, 1], adapter_name="b"), "already exists"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="cat", density=0.3), "density"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="cat", svd_rank=3), "svd_rank: apply to"),
    (dict(adapters=["a", "b"], weights=[1, 1], svd_driver="gesvd"), "CUDA only"),
    (dict(adapters=["a", "b"], weights=[1, 1], svd_clamp=1.5), "svd_clamp"),
    (dict(adapters=["a", "b"], weights=[1, 1], combination_type="linear"), "adapters of one rank"),
])
def test_bad_arguments_are_config_errors_and_change_nothing(kwargs, message):
    model = two_adapters()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ConfigError, match=message):
        model.add_weighted_adapter(**{"adapter_name": "new", **kwargs})
    assert sorted(model.peft_config) == ["a", "b"]
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_linear_with_weights_that_cancel_is_an_error_naming_the_layer():
    model = two_adapters(r_b=4, alpha_pattern={"v_proj": 3})  # v_proj: both scalings 3/4
    with pytest.raises(ConfigError, match="layer model.layers.0.self_attn.v_proj.*sum to 0"):
        model.add_weighted_adapter(["a", "b"], [1.0, -1.0], "lin", combination_type="linear")
    assert sorted(model.peft_config) == ["a", "b"]


def test_dora_inputs_are_refused():
    """A DoRA update is not s B A (the magnitude renormalises it): no weighted sum of factors."""
    model = two_adapters()
    model.add_adapter("d", lorakit.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="'d' is not a plain LoRA adapter"):
        model.add_weighted_adapter(["a", "d"], [1.0, 1.0], "new", combination_type="cat")
    assert "new" not in model.peft_config


def test_modules_to_save_clash_is_an_error_and_a_single_owner_is_copied():
    from interop.conftest import tiny_bert

    def build(task_b):
        torch.manual_seed(4)
        model = lorakit.get_peft_model(tiny_bert(), lorakit.LoraConfig(
            r=2, task_type="SEQ_CLS", target_modules=["query"], init_lora_weights=False), "a")
        model.add_adapter("b", lorakit.LoraConfig(r=2, task_type=task_b, target_modules=["value"],
                                                  init_lora_weights=False))
        return model

    with pytest.raises(ConfigError, match=r"save the same modules in full \(\['classifier'\]\)"):
        build("SEQ_CLS").add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="cat")
    model = build(None)
    head = model.get_base_model().classifier
    with torch.no_grad():
        head.modules_to_save["a"].weight.add_(1.0)  # a trained head
    model.add_weighted_adapter(["a", "b"], [1, 1], "new", combination_type="cat")
    assert torch.equal(head.modules_to_save["new"].weight, head.modules_to_save["a"].weight)
