"""Base embedding tables stored beside the adapter ("save_embedding_layers"), beyond the main
table: PEFT stores the base weight of every targeted input/output embedding (lm_head included,
though it is a Linear) and, with save_embedding_layers=True, the untargeted tables too (the
resized-vocabulary case). lorakit must write the same keys and load PEFT's files."""

import pytest

import lorakit

from .conftest import (
    ARCHS, HARMLESS_WARNINGS, load_in_peft, logits, lorakit_model, max_diff, peft_model,
    saved_tensors,
)

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]

CASES = [
    pytest.param(dict(target_modules=["q_proj", "lm_head"]), {}, id="lm_head-targeted"),
    pytest.param(dict(target_modules=["q_proj", "embed_tokens", "lm_head"]), {},
                 id="embed_tokens-and-lm_head-targeted"),
    pytest.param(dict(target_modules=["q_proj"]), dict(save_embedding_layers=True),
                 id="untargeted-save_embedding_layers-True"),
]


@pytest.mark.parametrize("overrides, save_kwargs", CASES)
def test_same_keys_as_peft(overrides, save_kwargs, tmp_path):
    arch = ARCHS["llama"]
    lorakit_model(arch, "plain", **overrides).save_pretrained(tmp_path / "lorakit", **save_kwargs)
    peft_model(arch, "plain", **overrides).save_pretrained(str(tmp_path / "peft"), **save_kwargs)
    lk_keys, _ = saved_tensors(tmp_path / "lorakit")
    pf_keys, _ = saved_tensors(tmp_path / "peft")
    assert sorted(set(pf_keys) - set(lk_keys)) == [], "keys only PEFT writes"
    assert lk_keys == pf_keys


@pytest.mark.parametrize("overrides, save_kwargs", CASES)
def test_peft_file_loads_in_lorakit(overrides, save_kwargs, tmp_path):
    arch = ARCHS["llama"]
    pm = peft_model(arch, "plain", **overrides)
    pm.save_pretrained(str(tmp_path), **save_kwargs)
    lk = lorakit.PeftModel.from_pretrained(arch.build(), tmp_path)
    assert max_diff(logits(lk, arch), logits(pm, arch)) <= 1e-6


@pytest.mark.parametrize("overrides, save_kwargs", [p.values[:2] for p in CASES],
                         ids=[p.id for p in CASES])
def test_lorakit_file_loads_in_peft(overrides, save_kwargs, tmp_path):
    arch = ARCHS["llama"]
    lk = lorakit_model(arch, "plain", **overrides)
    lk.save_pretrained(tmp_path, **save_kwargs)
    pm, result = load_in_peft(arch, tmp_path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert max_diff(logits(pm, arch), logits(lk, arch)) <= 1e-6
