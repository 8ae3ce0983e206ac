"""PiSSA and OLoRA initialisations (lorakit.variants.inits) against PEFT 0.21 on tiny models.

The table: (architecture, init). Llama's adapter also targets embed_tokens (which keeps LoRA's
default init in both libraries); GPT-2's c_attn is a Conv1D (weight stored (in, out)).
"""

from __future__ import annotations

import math
import warnings

import peft
import pytest
import torch

import lorakit
from interop.conftest import ARCHS, HARMLESS_WARNINGS, load_in_peft, logits, max_diff, saved_config
from lorakit.errors import AdapterFormatError, CompatibilityError, ConfigError
from lorakit.variants import inits

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS] + [
    pytest.mark.filterwarnings("ignore:init_lora_weights=.* does not apply to embedding"),
    pytest.mark.filterwarnings("ignore:.*randomized SVD on the base"),
]

TOL = 1e-6
CASES = [("llama", "pissa"), ("llama", "pissa_niter_2"), ("llama", "olora"),
         ("gpt2", "pissa"), ("gpt2", "pissa_niter_2")]
EXACT = [c for c in CASES if "niter" not in c[1]]  # deterministic in both libraries


def kwargs(arch_name: str, init, **overrides) -> dict:
    return {**ARCHS[arch_name].lora, "init_lora_weights": init, **overrides}


def train(model, seed: int = 7) -> None:
    """Stand-in for training: move every LoRA A and B away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def lk_model(arch_name: str, init, **overrides):
    arch = ARCHS[arch_name]
    return lorakit.get_peft_model(arch.build(), lorakit.LoraConfig(**kwargs(arch_name, init, **overrides))).eval()


def peft_init_model(arch_name: str, init, **overrides):
    arch = ARCHS[arch_name]
    return peft.get_peft_model(arch.build(), peft.LoraConfig(**kwargs(arch_name, init, **overrides))).eval()


def base_weights(model) -> dict[str, torch.Tensor]:
    """The targeted layers' base weights, by module name (same names in both libraries)."""
    return {n.removesuffix(".base_layer.weight"): p.detach().clone()
            for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


# --------------------------------------------------------------------------- the init itself

@pytest.mark.parametrize("arch_name,init", CASES)
def test_fresh_adapter_is_the_original_model(arch_name, init):
    arch = ARCHS[arch_name]
    original = logits(arch.build(), arch)
    model = lk_model(arch_name, init)
    assert max_diff(logits(model, arch), original) < 1e-5
    with pytest.warns(UserWarning, match="disable_adapter\\(\\) gives the residual model"):
        with model.disable_adapter():
            assert max_diff(logits(model, arch), original) > 1e-2
    # the base weights really are residuals: the linear ones changed, the embedding did not
    changed = {n: (w - arch.build().get_submodule(n.removeprefix("base_model.model.")).weight).abs().max().item()
               for n, w in base_weights(model).items()}
    for name, diff in changed.items():
        assert (diff == 0) == name.endswith("embed_tokens"), (name, diff)


@pytest.mark.parametrize("arch_name,init", EXACT)
def test_same_weights_as_peft(arch_name, init):
    """Same SVD / QR on the same fp32 input: A, B and the residual equal PEFT's."""
    lk, pm = lk_model(arch_name, init), peft_init_model(arch_name, init)
    lk_base, pm_base = base_weights(lk), base_weights(pm)
    assert lk_base.keys() == pm_base.keys()
    for name in lk_base:
        assert max_diff(lk_base[name], pm_base[name]) <= TOL, name
        module = lk.get_submodule(name)
        ad = module.adapters["default"]
        peft_layer = pm.get_submodule(name)
        if module.is_embedding:
            pa, pb = peft_layer.lora_embedding_A["default"], peft_layer.lora_embedding_B["default"]
            assert torch.count_nonzero(ad.lora_A) == 0  # LoRA's default embedding init, as PEFT
        else:
            pa, pb = peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight
            assert max_diff(ad.lora_A, pa) <= TOL and max_diff(ad.lora_B, pb) <= TOL, name


def test_bf16_base_matches_peft():
    """fp32 math, residual in bf16; A, B pass through bf16 before the fp32 adapter, as PEFT's."""
    arch = ARCHS["llama"]
    lk = lorakit.get_peft_model(arch.build().to(torch.bfloat16),
                                lorakit.LoraConfig(**kwargs("llama", "pissa", target_modules=["q_proj"])))
    pm = peft.get_peft_model(arch.build().to(torch.bfloat16),
                             peft.LoraConfig(**kwargs("llama", "pissa", target_modules=["q_proj"])))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    assert lk.get_submodule(name).base_layer.weight.dtype == torch.bfloat16
    assert torch.equal(lk.get_submodule(name).base_layer.weight, pm.get_submodule(name).base_layer.weight)
    ad = lk.get_submodule(name).adapters["default"]
    assert ad.lora_A.dtype == torch.float32
    assert torch.equal(ad.lora_A, pm.get_submodule(name).lora_A["default"].weight)
    assert torch.equal(ad.lora_B, pm.get_submodule(name).lora_B["default"].weight)


def test_randomized_svd_is_torch_svd_lowrank_with_a_seeded_sketch():
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    U, S, V = inits.randomized_svd(w, 5, niter=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(inits.NITER_SEED)
    U2, S2, V2 = torch.svd_lowrank(w, q=5, niter=3)
    for mine, torch_s in ((U, U2), (S, S2), (V, V2)):
        assert max_diff(mine, torch_s) < 1e-5
    torch.set_rng_state(state)


def test_pissa_factors_by_hand():
    """A = sqrt(S_r / s) U_r^T, B = V_r sqrt(S_r / s): s B A is the best rank-r approximation."""
    w = torch.randn(12, 9, generator=torch.Generator().manual_seed(5))
    a, b = inits.pissa(w, 3, scaling=2.0)
    U, S, Vh = torch.linalg.svd(w)
    best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
    assert max_diff(2.0 * b @ a, best) < 1e-5
    a, b = inits.olora(w, 3, scaling=2.0)
    assert torch.allclose(b.T @ b, torch.eye(3), atol=1e-6)  # orthonormal columns of Q


# --------------------------------------------------------------------------- files, both ways

@pytest.mark.parametrize("arch_name,init", EXACT)
def test_lorakit_adapter_loads_in_peft(arch_name, init, tmp_path):
    arch = ARCHS[arch_name]
    model = lk_model(arch_name, init)
    train(model)
    expected = logits(model, arch)
    model.save_pretrained(tmp_path)
    assert saved_config(tmp_path)["init_lora_weights"] == init
    loaded, result = load_in_peft(arch, tmp_path)  # PEFT re-runs the init on the original base
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert max_diff(logits(loaded, arch), expected) <= TOL
    again = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path)
    assert max_diff(logits(again, arch), expected) <= TOL


@pytest.mark.parametrize("arch_name,init", EXACT)
def test_peft_adapter_loads_in_lorakit(arch_name, init, tmp_path):
    arch = ARCHS[arch_name]
    model = peft_init_model(arch_name, init)
    train(model)
    expected = logits(model, arch)
    model.save_pretrained(tmp_path)
    loaded = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path)
    assert max_diff(logits(loaded, arch), expected) <= TOL


def test_pissa_niter_reloads_exactly_in_lorakit_and_warns(tmp_path):
    arch = ARCHS["llama"]
    model = lk_model("llama", "pissa_niter_2")
    train(model)
    expected = logits(model, arch)
    with pytest.warns(UserWarning, match="PEFT draws it from its global random state"):
        model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="path_initial_model_for_weight_conversion"):
        loaded = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path)
    assert max_diff(logits(loaded, arch), expected) <= TOL


# --------------------------------------------------------------------------- conversion to LoRA

CONVERSIONS = [("llama", "pissa", {}), ("llama", "olora", {}), ("gpt2", "pissa", {}),
               ("llama", "pissa_niter_2", {}),
               ("llama", "pissa", {"use_rslora": True, "rank_pattern": {"q_proj": 2},
                                   "alpha_pattern": {"v_proj": 32}})]


@pytest.mark.parametrize("arch_name,init,extra", CONVERSIONS, ids=lambda v: str(v) if v else "-")
def test_conversion_gives_the_fine_tuned_model_on_the_original_base(arch_name, init, extra, tmp_path):
    arch = ARCHS[arch_name]
    model = lk_model(arch_name, init, **extra)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(tmp_path / "init")
    train(model)
    expected = logits(model, arch)
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = saved_config(tmp_path / "lora")
    assert config["init_lora_weights"] is True and config["r"] == 2 * arch.lora["r"]
    factor = math.sqrt(2) if extra.get("use_rslora") else 2
    assert config["lora_alpha"] == pytest.approx(arch.lora["lora_alpha"] * factor)
    assert config["rank_pattern"] == {k: 2 * v for k, v in extra.get("rank_pattern", {}).items()}
    assert config["alpha_pattern"] == pytest.approx({k: v * factor for k, v in extra.get("alpha_pattern", {}).items()})
    assert saved_config(tmp_path / "init")["init_lora_weights"] == init  # left unchanged
    plain = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path / "lora")
    assert max_diff(logits(plain, arch), expected) <= TOL
    in_peft, result = load_in_peft(arch, tmp_path / "lora")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert max_diff(logits(in_peft, arch), expected) <= TOL


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights")
def test_peft_pissa_adapter_converts_in_lorakit_like_peft(tmp_path):
    """PEFT's init dir + trained adapter, converted by PEFT and by lorakit: the same tensors."""
    arch = ARCHS["llama"]
    extra = {"target_modules": ["q_proj", "down_proj"]}
    pm = peft_init_model("llama", "pissa", **extra)
    pm.save_pretrained(tmp_path / "init")
    train(pm)
    pm.save_pretrained(tmp_path / "trained")
    pm.save_pretrained(tmp_path / "peft_lora", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    lk = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path / "trained")
    lk.save_pretrained(tmp_path / "lk_lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    from safetensors.torch import load_file

    theirs = load_file(tmp_path / "peft_lora" / "adapter_model.safetensors")
    ours = load_file(tmp_path / "lk_lora" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert max_diff(theirs[key], ours[key]) <= TOL, key
    for field in ("r", "lora_alpha", "init_lora_weights"):
        assert saved_config(tmp_path / "lk_lora")[field] == saved_config(tmp_path / "peft_lora")[field]


def test_conversion_refuses_a_mismatched_initial_adapter(tmp_path):
    lk_model("llama", "pissa", target_modules=["q_proj"]).save_pretrained(tmp_path / "q_only")
    lk_model("llama", "pissa", r=2).save_pretrained(tmp_path / "r2")
    model = lk_model("llama", "pissa")
    with pytest.raises(AdapterFormatError, match="lacks tensors"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "q_only")
    with pytest.raises(CompatibilityError, match="shapes differ"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "r2")
    random_init = lk_model("llama", False)
    random_init.save_pretrained(tmp_path / "rand")
    with pytest.raises(ConfigError, match="init_lora_weights=False"):
        random_init.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "rand")


# --------------------------------------------------------------------------- merge, unload, warnings

@pytest.mark.parametrize("arch_name,init", [("llama", "pissa"), ("gpt2", "pissa"), ("llama", "olora")])
def test_merge_and_unload_is_the_adapted_model(arch_name, init):
    arch = ARCHS[arch_name]
    model = lk_model(arch_name, init)
    train(model)
    expected = logits(model, arch)
    merged = model.merge_and_unload()
    assert max_diff(logits(merged, arch), expected) < 1e-5


def test_unload_returns_the_residual_model_with_a_warning():
    arch = ARCHS["llama"]
    original = logits(arch.build(), arch)
    model = lk_model("llama", "pissa")
    with pytest.warns(UserWarning, match="unload\\(\\) returns the residual model"):
        residual = model.unload()
    assert max_diff(logits(residual, arch), original) > 1e-2


def test_a_second_adapter_beside_pissa_warns_as_peft():
    model = lk_model("llama", "olora")
    with pytest.warns(UserWarning, match="should not share the model with other adapters"):
        model.add_adapter("other", lorakit.LoraConfig(r=2, target_modules=["q_proj"]))


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_0", "pissa_niter_16", "olora", "OLoRA", "Gaussian"])
def test_config_accepts(init):
    assert lorakit.LoraConfig(init_lora_weights=init).init_lora_weights == init


@pytest.mark.parametrize("init,message", [
    ("pissa_niter_", "non-negative integer"), ("pissa_niter_x", "non-negative integer"),
    ("pissa_niter_-1", "non-negative integer"), ("PiSSA", "lower case"),
    ("loftq", "loftq initialisation is not implemented"), ("eva", "eva initialisation"),
    ("corda", "corda initialisation"), ("orthogonal", "orthogonal initialisation"),
    ("mica", "mica initialisation"), ("lora_ga", "lora_ga initialisation"), ("svd", "lorakit supports"),
])
def test_config_refuses(init, message):
    with pytest.raises(ConfigError, match=message):
        lorakit.LoraConfig(init_lora_weights=init)


def test_rank_above_the_layer_size_is_refused_before_any_weight_changes():
    arch = ARCHS["llama"]
    base = arch.build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    # q_proj (rank 4) comes first and could be initialised; gate_proj (rank 40 > 32) cannot
    with pytest.raises(ConfigError, match=r"(?s)model is unchanged.*gate_proj: r=40 exceeds min\(in, out\)=32"):
        lorakit.get_peft_model(base, lorakit.LoraConfig(r=40, target_modules=["q_proj", "gate_proj"],
                                                        rank_pattern={"q_proj": 4}, init_lora_weights="pissa"))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_olora_on_conv1d_is_refused_with_the_reason():
    base = ARCHS["gpt2"].build()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ConfigError, match="fan_in_fan_out.*PEFT 0.21"):
        lorakit.get_peft_model(base, lorakit.LoraConfig(**kwargs("gpt2", "olora")))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_dora_over_pissa_loads_in_peft_and_is_not_converted(tmp_path):
    """DoRA's magnitude is taken after PiSSA made the residual, in both libraries."""
    arch = ARCHS["llama"]
    model = lk_model("llama", "pissa", target_modules=["q_proj", "down_proj"], use_dora=True)
    assert max_diff(logits(model, arch), logits(arch.build(), arch)) < 1e-5
    model.save_pretrained(tmp_path / "init")
    train(model)
    expected = logits(model, arch)
    model.save_pretrained(tmp_path / "trained")
    loaded, result = load_in_peft(arch, tmp_path / "trained")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert max_diff(logits(loaded, arch), expected) <= TOL
    with pytest.raises(ConfigError, match="DoRA"):
        model.save_pretrained(tmp_path / "out", path_initial_model_for_weight_conversion=tmp_path / "init")
