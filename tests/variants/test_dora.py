"""DoRA against PEFT, against the plain-PyTorch reference forward and against hand computations:
the norm without B A, the magnitude's initial value, outputs and gradients of the fused and the
reference path (fp32 rtol 1e-5, bf16 within rounding), merge / unmerge, several adapters, files
in both directions (also after training, so that B != 0 and m != ||W||), and the refusals."""

import re

import peft
import pytest
import torch
import torch.nn as nn

import lorakit
from interop.conftest import SEVEN, VOCAB, load_in_peft, saved_tensors, tiny_gpt2, tiny_llama
from lorakit.kernels import fused
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.layer import LoraLinear
from lorakit.variants import dora

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(123))
ARCHS = {  # name -> (builder, LoraConfig arguments shared by both libraries)
    "llama": (tiny_llama, dict(r=4, lora_alpha=12, target_modules=SEVEN)),
    "gpt2": (tiny_gpt2, dict(r=4, lora_alpha=12, target_modules=["c_attn", "mlp.c_proj"], fan_in_fan_out=True)),
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb(model, seed=7):
    """Random B and magnitudes away from ||W + sBA||, so that every DoRA term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def lk_model(arch="llama", seed=1, **overrides):
    build, kwargs = ARCHS[arch]
    torch.manual_seed(seed)
    config = lorakit.LoraConfig(**{**kwargs, "use_dora": True, **overrides})
    return perturb(lorakit.get_peft_model(build(), config)).eval()


def peft_name(name):
    """lorakit's parameter name -> PEFT's."""
    name = re.sub(r"\.adapters\.([^.]+)\.lora_(A|B)$", r".lora_\2.\1.weight", name)
    return re.sub(r"\.adapters\.([^.]+)\.lora_magnitude_vector$", r".lora_magnitude_vector.\1.weight", name)


class _Build:
    def __init__(self, build):
        self.build = build


def as_peft(lk, arch, tmp_path, is_trainable=False):
    """PEFT holding lorakit's adapter, through the file; asserts no missing/unexpected keys."""
    lk.save_pretrained(tmp_path)
    pm, result = load_in_peft(_Build(ARCHS[arch][0]), tmp_path, is_trainable)
    assert result.missing_keys == [] and result.unexpected_keys == []
    return pm


def step(model, seed=0, autocast=False):
    """Loss and gradients (PEFT's names) of one forward/backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    return loss.detach(), {peft_name(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# --------------------------------------------------------------------------- the math

@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_norm_without_ba_equals_the_direct_norm(fan_in_fan_out):
    torch.manual_seed(0)
    base = nn.Linear(24, 40) if not fan_in_fan_out else type("Conv1D", (nn.Module,), {})()
    if fan_in_fan_out:
        base.weight = nn.Parameter(torch.randn(24, 40))  # (in, out), as GPT-2 stores it
    layer = LoraLinear(base, fan_in_fan_out=fan_in_fan_out)
    a = layer.add_adapter("x", r=4, lora_alpha=8, init=False)
    w = (base.weight.t() if fan_in_fan_out else base.weight).detach().clone()  # (out, in)
    expected = torch.linalg.norm(w + a.scaling * a.lora_B.detach() @ a.lora_A.detach(), dim=1)
    torch.testing.assert_close(dora.weight_norm(layer, a), expected, rtol=1e-5, atol=0)
    dora.add_magnitude(layer, "x")  # m starts at ||W + s B A|| (B random here)
    torch.testing.assert_close(a.lora_magnitude_vector.detach(), expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        base.weight.mul_(2)  # an in-place change of W: the cached ||w_i||^2 must follow
    expected = torch.linalg.norm(2 * w + a.scaling * a.lora_B.detach() @ a.lora_A.detach(), dim=1)
    torch.testing.assert_close(dora.weight_norm(layer, a), expected, rtol=1e-5, atol=0)


def test_forward_is_the_papers_formula_by_hand():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 12))
    layer.base_layer.requires_grad_(False)
    a = layer.add_adapter("d", r=2, lora_alpha=4, init=False)
    dora.add_magnitude(layer, "d")
    layer.active_adapters = ["d"]
    with torch.no_grad():
        a.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 12))
    w, b = layer.base_layer.weight, layer.base_layer.bias
    merged = w + a.scaling * a.lora_B @ a.lora_A  # (out, in)
    x = torch.randn(5, 16)
    expected = x @ (a.lora_magnitude_vector[:, None] * merged / merged.norm(dim=1, keepdim=True)).t() + b
    for on in (True, False):
        with (fused.disabled(layer) if not on else torch.enable_grad()):
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    node = layer(x).grad_fn  # a view of one node
    assert type(node.next_functions[0][0]).__name__ == "_DoraLinearBackward"


# --------------------------------------------------------------------------- against PEFT

@pytest.mark.parametrize("arch", ARCHS)
def test_lorakit_file_loads_in_peft_with_identical_outputs(arch, tmp_path):
    lk = lk_model(arch, init_lora_weights=False)
    keys, _ = saved_tensors(lk.save_pretrained(tmp_path) or tmp_path)
    assert sum(k.endswith(".lora_magnitude_vector") for k in keys) == len(keys) // 3
    pm = as_peft(lk, arch, tmp_path)
    assert (logits(lk) - logits(pm)).abs().max() <= 1e-6
    with fused.disabled(lk):
        assert (logits(lk) - logits(pm)).abs().max() <= 1e-6


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_file_loads_in_lorakit_with_identical_outputs(arch, tmp_path):
    build, kwargs = ARCHS[arch]
    torch.manual_seed(2)
    pm = perturb(peft.get_peft_model(build(), peft.LoraConfig(**kwargs, use_dora=True)), seed=3).eval()
    pm.save_pretrained(tmp_path)
    lk = lorakit.PeftModel.from_pretrained(build(), tmp_path)  # strict: every key used, none missing
    assert (logits(lk) - logits(pm)).abs().max() <= 1e-6


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_reference_and_peft_give_the_same_step_fp32(dropout, tmp_path):
    lk = lk_model(lora_dropout=dropout).train()
    pm = as_peft(lk, "llama", tmp_path, is_trainable=True).train()
    loss_fast, g_fast = step(lk)
    with fused.disabled(lk):
        loss_ref, g_ref = step(lk)
    loss_peft, g_peft = step(pm)
    assert set(g_fast) == set(g_peft) and sum("magnitude" in k for k in g_fast) == 14
    torch.testing.assert_close(loss_fast, loss_peft, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_ref, loss_peft, rtol=1e-5, atol=1e-6)
    for k in g_peft:
        torch.testing.assert_close(g_fast[k], g_peft[k], rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(g_ref[k], g_peft[k], rtol=1e-5, atol=1e-6, msg=k)


def test_bf16_autocast_within_rounding(tmp_path):
    lk = lk_model().train()
    pm = as_peft(lk, "llama", tmp_path, is_trainable=True).train()
    loss_fast, g_fast = step(lk, autocast=True)
    loss_peft, g_peft = step(pm, autocast=True)
    _, g_fp32 = step(pm)
    torch.testing.assert_close(loss_fast, loss_peft, rtol=2e-2, atol=0)
    for k in g_peft:  # both bf16 results as close to fp32 as each other, up to bf16 rounding
        scale = g_fp32[k].abs().max()
        assert (g_fast[k] - g_fp32[k]).abs().max() <= 0.05 * scale + 2 * (g_peft[k] - g_fp32[k]).abs().max(), k


def test_training_in_lorakit_then_peft_and_back(tmp_path):
    lk = lk_model(init_lora_weights=True)  # B = 0, m = ||W||: training moves both
    m0 = {n: p.detach().clone() for n, p in lk.named_parameters() if "magnitude" in n}
    opt = torch.optim.AdamW([p for p in lk.parameters() if p.requires_grad], lr=1e-2)
    lk.train()
    for i in range(3):
        step(lk, seed=i)
        opt.step()
    assert all((m0[n] - p).abs().max() > 1e-4 for n, p in lk.named_parameters() if n in m0)
    lk.eval()
    pm = as_peft(lk, "llama", tmp_path / "a", is_trainable=True)
    assert (logits(lk) - logits(pm)).abs().max() <= 1e-6
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    pm.train()
    step(pm)
    opt.step()
    pm.eval().save_pretrained(tmp_path / "b")
    back = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path / "b")
    assert (logits(back) - logits(pm)).abs().max() <= 1e-6


# --------------------------------------------------------------------------- merging, several adapters

@pytest.mark.parametrize("arch", ARCHS)
def test_merge_unmerge_and_merge_and_unload(arch, tmp_path):
    lk = lk_model(arch)
    pm = as_peft(lk, arch, tmp_path)
    before = logits(lk)
    weights = {n: p.detach().clone() for n, p in lk.named_parameters() if "base_layer.weight" in n}
    lk.merge_adapter()
    pm.merge_adapter()
    torch.testing.assert_close(logits(lk), before, rtol=1e-5, atol=1e-5)
    merged_lk = {n.replace(".base_layer", ""): p for n, p in lk.named_parameters() if "base_layer.weight" in n}
    for n, p in pm.named_parameters():
        if "base_layer.weight" in n:
            torch.testing.assert_close(merged_lk[n.replace(".base_layer", "")], p, rtol=1e-5, atol=1e-6)
    lk.unmerge_adapter()
    for n, p in lk.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(lk), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(lk.merge_and_unload()), before, rtol=1e-5, atol=1e-5)


def test_two_adapters_set_disable_and_merge_as_peft(tmp_path):
    lk = lk_model()
    lk.add_adapter("other", lorakit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                               use_dora=True))
    perturb(lk, seed=11)
    lk.save_pretrained(tmp_path)
    pm, _ = load_in_peft(_Build(tiny_llama), tmp_path)
    pm.load_adapter(str(tmp_path / "other"), "other")
    base = logits(tiny_llama())
    for active in (["default"], ["other"], ["default", "other"]):
        lk.set_adapter(active)
        pm.base_model.set_adapter(active)
        assert (logits(lk) - logits(pm)).abs().max() <= 1e-6, active
        with lk.disable_adapter():
            assert (logits(lk) - base).abs().max() <= 1e-6
    lk.merge_adapter(["default", "other"])  # the second norm is taken on the unmerged W, as PEFT
    pm.merge_adapter(["default", "other"])
    assert (logits(lk) - logits(pm)).abs().max() <= 1e-5
    lk.unmerge_adapter()
    assert (logits(lk) - logits(pm.unmerge_adapter() or pm)).abs().max() <= 1e-5


# --------------------------------------------------------------------------- refusals

def test_dora_on_an_embedding_is_refused_before_anything_is_wrapped():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"embed_tokens.*use_dora=False"):
        lorakit.get_peft_model(model, lorakit.LoraConfig(target_modules=["q_proj", "embed_tokens"], use_dora=True))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    with pytest.raises(ConfigError, match="use_dora='yes'"):
        lorakit.LoraConfig(use_dora="yes")


def test_a_dora_config_whose_file_lacks_magnitudes_is_refused(tmp_path):
    lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    config = lorakit.LoraConfig.from_pretrained(tmp_path)
    config.use_dora = True
    config.save_pretrained(tmp_path)
    with pytest.raises(AdapterFormatError, match="missing tensors:.*q_proj.lora_magnitude_vector"):
        lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path)
