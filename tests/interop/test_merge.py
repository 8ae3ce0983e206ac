"""Merging, disabling and unloading: the merged model equals the unmerged one, a disabled adapter
is the base model, unload gives back the very modules and weights, and merged weights are PEFT's."""

import pytest
import torch

from lorakit.inject import ModulesToSave
from lorakit.layer import LoraLayer

from .conftest import (
    ARCHS, HARMLESS_WARNINGS, cases, clone_state_dict, fresh_copy, load_in_peft, logits,
    lorakit_model, max_diff,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]


def no_lorakit_modules(model):
    return not [m for m in model.modules() if isinstance(m, (LoraLayer, ModulesToSave))]


@pytest.mark.parametrize("arch_name, variant", cases("merge"))
def test_merge_and_unload_equals_unmerged(arch_name, variant):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, variant)
    user_model = lk.get_base_model()
    unmerged = logits(lk, arch)

    merged = lk.merge_and_unload()
    assert merged is user_model
    assert no_lorakit_modules(merged)
    for name in arch.targets:
        assert type(merged.get_submodule(name)) in arch.target_types, name
    assert max_diff(logits(merged, arch), unmerged) <= 1e-5


@pytest.mark.parametrize("arch_name, variant", cases("merge_vs_peft"))
def test_merged_weights_equal_peft(arch_name, variant, tmp_path):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, variant)
    lk.save_pretrained(tmp_path)
    pm, _ = load_in_peft(arch, tmp_path)

    lk_state = lk.merge_and_unload().state_dict()
    pf_state = pm.merge_and_unload().state_dict()
    assert sorted(lk_state) == sorted(pf_state) == sorted(arch.build().state_dict())
    for key, value in pf_state.items():
        assert max_diff(lk_state[key], value) <= 1e-6, key


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_merge_adapter_in_place_equals_peft(arch_name, tmp_path):
    arch = ARCHS[arch_name]
    lk = lorakit_model(arch, "plain")
    lk.save_pretrained(tmp_path)
    pm, _ = load_in_peft(arch, tmp_path)
    lk.merge_adapter()
    pm.merge_adapter()
    for name in arch.targets:
        lk_w = lk.get_base_model().get_submodule(name).base_layer.weight
        pf_w = pm.get_base_model().get_submodule(name).base_layer.weight
        assert max_diff(lk_w, pf_w) <= 1e-6, name
    assert max_diff(logits(lk, arch), logits(pm, arch)) <= 1e-5


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_disable_adapter_is_exactly_the_base_model(arch_name):
    arch = ARCHS[arch_name]
    base = arch.build()
    state = clone_state_dict(base)
    reference = logits(fresh_copy(arch.build, state), arch)
    lk = lorakit_model(arch, "plain", base=base)
    with_adapter = logits(lk, arch)
    assert max_diff(with_adapter, reference) > 1e-3

    with lk.disable_adapter():
        assert torch.equal(logits(lk, arch), reference)
    assert torch.equal(logits(lk, arch), with_adapter)

    # A merged adapter is taken out for the block and put back after.
    lk.merge_adapter()
    with lk.disable_adapter():
        assert max_diff(logits(lk, arch), reference) <= 1e-5
    assert max_diff(logits(lk, arch), with_adapter) <= 1e-5


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_unload_gives_back_the_original_modules_and_weights(arch_name):
    arch = ARCHS[arch_name]
    base = arch.build()
    state = clone_state_dict(base)
    originals = {name: base.get_submodule(name) for name in arch.targets + arch.saved_modules}
    for name in arch.targets:
        assert type(originals[name]) in arch.target_types, name

    lk = lorakit_model(arch, "plain", base=base)
    for name, module in originals.items():
        assert base.get_submodule(name) is not module, f"{name} was not wrapped"
    restored = lk.unload()

    assert restored is base
    assert no_lorakit_modules(restored)
    for name, module in originals.items():
        assert restored.get_submodule(name) is module, name
        assert type(restored.get_submodule(name)) is type(module), name
    restored_state = restored.state_dict()
    assert sorted(restored_state) == sorted(state)
    for key, value in state.items():
        assert torch.equal(restored_state[key], value), key
    assert torch.equal(logits(restored, arch), logits(fresh_copy(arch.build, state), arch))


@pytest.mark.parametrize("arch_name", list(ARCHS))
def test_merge_then_unmerge_restores_the_weights(arch_name):
    arch = ARCHS[arch_name]
    base = arch.build()
    state = clone_state_dict(base)
    weights = {name: base.get_submodule(name).weight for name in arch.targets}
    lk = lorakit_model(arch, "plain", base=base)
    unmerged = logits(lk, arch)

    lk.merge_adapter()
    # 1e-6 relative to the largest merged weight (at least 1): W + D - D is exact only up to
    # fp32 rounding at |W + D|, and the embedding's random update (A, B ~ N(0, 1), as in PEFT)
    # reaches about 40, where one ulp is 4e-6 (PEFT's round trip is off by the same amount).
    tol = {name: 1e-6 * max(1.0, w.abs().max().item()) for name, w in weights.items()}
    for name, w in weights.items():
        assert max_diff(w, state[f"{name}.weight"]) > 1e-4, f"{name} did not change on merge"
    assert max_diff(logits(lk, arch), unmerged) <= 1e-5
    lk.unmerge_adapter()
    for name, w in weights.items():
        assert max_diff(w, state[f"{name}.weight"]) <= tol[name], name
    assert max_diff(logits(lk, arch), unmerged) <= 1e-5

    # unload() of a merged model unmerges first.
    lk.merge_adapter()
    restored = lk.unload()
    for name, w in weights.items():
        assert restored.get_submodule(name).weight is w
        assert max_diff(w, state[f"{name}.weight"]) <= tol[name], name
