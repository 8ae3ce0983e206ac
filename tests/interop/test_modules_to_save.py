"""modules_to_save follows PEFT's matching rule: a module is trained in full when its name ENDS
WITH an entry (``peft.utils.other._set_trainable``), so "norm" wraps every RMSNorm of a Llama
(input_layernorm, post_attention_layernorm, model.norm). Adapters with such entries load in
both directions with the same outputs."""

import peft
import pytest
import torch

import lorakit
from lorakit import ConfigError

from .conftest import HARMLESS_WARNINGS, LLAMA, logits, max_diff, perturb_extra_trainables

pytestmark = [pytest.mark.filterwarnings(w) for w in HARMLESS_WARNINGS]

NORMS = sorted([f"model.layers.{i}.{n}" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")]
               + ["model.norm"])
KWARGS = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["norm"],
              init_lora_weights=False, task_type="CAUSAL_LM")


def _wrapped(model, cls) -> list[str]:
    return sorted(n for n, m in model.get_base_model().named_modules() if isinstance(m, cls))


def test_norm_wraps_every_module_whose_name_ends_in_norm_as_in_peft():
    ours = lorakit.get_peft_model(LLAMA.build(), lorakit.LoraConfig(**KWARGS))
    theirs = peft.get_peft_model(LLAMA.build(), peft.LoraConfig(**KWARGS))
    assert _wrapped(ours, lorakit.inject.ModulesToSave) == NORMS
    assert _wrapped(theirs, peft.utils.other.ModulesToSaveWrapper) == NORMS


def test_a_peft_adapter_with_modules_to_save_norm_loads_in_lorakit_with_the_same_outputs(tmp_path):
    torch.manual_seed(2)
    theirs = peft.get_peft_model(LLAMA.build(), peft.LoraConfig(**KWARGS))
    perturb_extra_trainables(theirs, 2)
    theirs.eval().save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(LLAMA.build(), tmp_path)
    assert _wrapped(ours, lorakit.inject.ModulesToSave) == NORMS
    assert max_diff(logits(ours, LLAMA), logits(theirs, LLAMA)) < 1e-5
    assert max_diff(logits(ours, LLAMA), logits(LLAMA.build(), LLAMA)) > 1e-3  # the norms took effect


def test_a_lorakit_adapter_with_modules_to_save_norm_loads_in_peft_with_the_same_outputs(tmp_path):
    torch.manual_seed(1)
    ours = lorakit.get_peft_model(LLAMA.build(), lorakit.LoraConfig(**KWARGS))
    perturb_extra_trainables(ours, 1)
    ours.eval().save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(LLAMA.build(), str(tmp_path)).eval()
    assert _wrapped(theirs, peft.utils.other.ModulesToSaveWrapper) == NORMS
    assert max_diff(logits(ours, LLAMA), logits(theirs, LLAMA)) < 1e-5
    assert max_diff(logits(ours, LLAMA), logits(LLAMA.build(), LLAMA)) > 1e-3


def test_an_entry_that_would_wrap_a_lora_layer_is_refused_before_the_model_changes():
    # PEFT wraps the LoRA layers q_proj and v_proj themselves in a ModulesToSaveWrapper here
    # (their names end with "proj"); lorakit refuses: a module is adapted or trained in full.
    base = LLAMA.build()
    with pytest.raises(ConfigError, match=r"modules_to_save entry 'proj' matches 'model\.layers\.0\.self_attn\.q_proj'"):
        lorakit.get_peft_model(base, lorakit.LoraConfig(**{**KWARGS, "modules_to_save": ["proj"]}))
    assert not any(isinstance(m, (lorakit.layer.LoraLayer, lorakit.inject.ModulesToSave)) for m in base.modules())
