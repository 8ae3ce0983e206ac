"""Shared pieces of the PEFT interop tests: tiny models, the architecture x variant table, and
helpers that save, read and load adapter directories in both libraries.

The builders are plain functions so that other test folders can import them
(``from interop.conftest import tiny_llama, ARCHS``). Every model is built from a transformers
config class with a fixed seed and no dropout, so two builds are bitwise equal.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import peft
import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import (
    BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import lorakit

VOCAB = 100
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Warnings that PEFT and transformers give on every run of these tests and that say nothing
# about the behaviour under test.
HARMLESS_WARNINGS = [
    # PEFT saves the base embedding table beside an adapter that targets embed_tokens (lorakit too).
    "ignore:Setting `save_embedding_layers` to `True`:UserWarning",
    # transformers 5 deprecation, triggered inside PEFT's get_peft_model.
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning",
]


# --------------------------------------------------------------------------- tiny models

def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    kwargs = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                  attention_dropout=0.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**kwargs)).eval()


def tiny_gpt2(seed: int = 0, **overrides) -> GPT2LMHeadModel:
    kwargs = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**kwargs)).eval()


def tiny_bert(seed: int = 0, **overrides) -> BertForSequenceClassification:
    kwargs = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  vocab_size=VOCAB, max_position_embeddings=64, num_labels=3,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(**kwargs)).eval()


def clone_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of ``model.state_dict()`` (tensors detached and cloned)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_copy(build: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
    """A new instance of the architecture holding exactly ``state``."""
    model = build()
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Arch:
    """One tiny architecture and the LoRA configuration the issue asks for on it."""

    name: str
    build: Callable[[], nn.Module]
    lora: dict
    """LoraConfig arguments shared by lorakit and PEFT."""
    patterns: dict
    """rank_pattern / alpha_pattern for the "patterns" variant (no two keys overlap)."""
    pattern_shapes: dict
    """Saved tensor key -> shape that proves the rank_pattern took effect."""
    targets: list
    """Module paths (in the user's model) that the adapter wraps."""
    target_types: tuple
    """The exact types of those modules before wrapping (and after unload)."""
    saved_modules: list = field(default_factory=list)
    """modules_to_save paths."""
    seq_cls: bool = False

    def batch(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(123)
        ids = torch.randint(0, VOCAB, (2, 7), generator=g)
        labels = torch.tensor([0, 2]) if self.seq_cls else ids
        return {"input_ids": ids, "labels": labels}

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.batch()["input_ids"]}


def _paths(fmt: str, names, layers=2) -> list[str]:
    return [fmt.format(i=i, n=n) for i in range(layers) for n in names]


LLAMA = Arch(
    name="llama",
    build=tiny_llama,
    lora=dict(r=4, lora_alpha=12, task_type="CAUSAL_LM", target_modules=SEVEN + ["embed_tokens"]),
    patterns=dict(rank_pattern={"q_proj": 2, "model.layers.1.mlp.down_proj": 3},
                  alpha_pattern={"v_proj": 32, "model.layers.0.self_attn.o_proj": 4}),
    pattern_shapes={
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (2, 32),
        "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": (32, 2),
        "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight": (3, 64),
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": (4, 64),
    },
    targets=["model.embed_tokens"]
    + _paths("model.layers.{i}.self_attn.{n}", ["q_proj", "k_proj", "v_proj", "o_proj"])
    + _paths("model.layers.{i}.mlp.{n}", ["gate_proj", "up_proj", "down_proj"]),
    target_types=(nn.Linear, nn.Embedding),
)

GPT2 = Arch(
    name="gpt2",
    build=tiny_gpt2,
    lora=dict(r=4, lora_alpha=12, task_type="CAUSAL_LM", target_modules=["c_attn"],
              fan_in_fan_out=True),
    patterns=dict(rank_pattern={"transformer.h.1.attn.c_attn": 2},
                  alpha_pattern={"transformer.h.0.attn.c_attn": 32}),
    pattern_shapes={
        "base_model.model.transformer.h.1.attn.c_attn.lora_A.weight": (2, 32),
        "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight": (4, 32),
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight": (96, 4),
    },
    targets=_paths("transformer.h.{i}.attn.{n}", ["c_attn"]),
    target_types=(Conv1D,),
)

BERT = Arch(
    name="bert",
    build=tiny_bert,
    lora=dict(r=4, lora_alpha=12, task_type="SEQ_CLS", target_modules=["query", "value"],
              modules_to_save=["classifier"]),
    patterns=dict(rank_pattern={"query": 2},
                  alpha_pattern={"bert.encoder.layer.1.attention.self.value": 32}),
    pattern_shapes={
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight": (2, 32),
        "base_model.model.bert.encoder.layer.1.attention.self.value.lora_A.weight": (4, 32),
    },
    targets=_paths("bert.encoder.layer.{i}.attention.self.{n}", ["query", "value"]),
    target_types=(nn.Linear,),
    saved_modules=["classifier"],
    seq_cls=True,
)

ARCHS = {a.name: a for a in (LLAMA, GPT2, BERT)}

# Variant name -> extra LoraConfig arguments (a callable takes the Arch).
VARIANTS: dict[str, dict | Callable[[Arch], dict]] = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": lambda arch: arch.patterns,
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
}

# Core bugs found by these tests and not fixed yet: (arch, variant) -> {test key: reason}. The
# listed tests are marked xfail(strict=True), so a fix shows up as XPASS -> failure.
KNOWN_BUGS: dict[tuple[str, str], dict[str, str]] = {}


def cases(test_key: str) -> list:
    """The architecture x variant table as pytest params, with the known bugs of ``test_key``
    marked xfail(strict=True)."""
    params = []
    for arch in ARCHS:
        for variant in VARIANTS:
            reason = KNOWN_BUGS.get((arch, variant), {}).get(test_key)
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(arch, variant, id=f"{arch}-{variant}", marks=marks))
    return params


def config_kwargs(arch: Arch, variant: str, **overrides) -> dict:
    extra = VARIANTS[variant]
    extra = extra(arch) if callable(extra) else extra
    return {**arch.lora, "init_lora_weights": False, **extra, **overrides}


# --------------------------------------------------------------------------- models and files

def perturb_extra_trainables(model: nn.Module, seed: int) -> None:
    """Add noise to every modules_to_save copy and every other trainable parameter that is not a
    LoRA A/B (trained biases), so that saving and loading them shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                continue
            if ".modules_to_save." in name or p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)


def lorakit_model(arch: Arch, variant: str, seed: int = 1, base: nn.Module | None = None,
                  **overrides) -> lorakit.PeftModel:
    """``arch`` with a lorakit adapter "default" (random A and B, perturbed extras), in eval mode."""
    base = arch.build() if base is None else base
    torch.manual_seed(seed)
    model = lorakit.get_peft_model(base, lorakit.LoraConfig(**config_kwargs(arch, variant, **overrides)))
    perturb_extra_trainables(model, seed)
    return model.eval()


def peft_model(arch: Arch, variant: str, seed: int = 2, base: nn.Module | None = None,
               **overrides) -> peft.PeftModel:
    """The same with PEFT (other random weights: each direction is checked on its own)."""
    base = arch.build() if base is None else base
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(**config_kwargs(arch, variant, **overrides)))
    perturb_extra_trainables(model, seed)
    return model.eval()


def load_in_peft(arch: Arch, directory, is_trainable: bool = False):
    """Load an adapter directory in PEFT through ``load_adapter``; returns (model, load result)."""
    config = peft.LoraConfig.from_pretrained(str(directory))
    config.inference_mode = not is_trainable
    model = peft.get_peft_model(arch.build(), config)
    result = model.load_adapter(str(directory), "default", is_trainable=is_trainable)
    return (model.train() if is_trainable else model.eval()), result


def saved_tensors(directory) -> tuple[dict[str, tuple], dict]:
    """(key -> shape, metadata) of ``directory/adapter_model.safetensors``."""
    with safe_open(str(Path(directory) / "adapter_model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


def saved_config(directory) -> dict:
    return json.loads((Path(directory) / "adapter_config.json").read_text())


def adapter_files(directory) -> set[str]:
    """The adapter files under ``directory``, relative (PEFT's README.md left out)."""
    root = Path(directory)
    return {str(p.relative_to(root)) for p in root.rglob("adapter_*")}


def logits(model: nn.Module, arch: Arch) -> torch.Tensor:
    with torch.no_grad():
        return model(**arch.inputs()).logits


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


_LK_ADAPTER = re.compile(r"^(?P<module>.*)\.adapters\.(?P<adapter>[^.]+)\.lora_(?P<ab>[AB])$")


def peft_parameter_name(lk_model: lorakit.PeftModel, name: str) -> str:
    """lorakit's parameter name -> PEFT's: ``<m>.adapters.<n>.lora_A`` -> ``<m>.lora_A.<n>.weight``
    (``<m>.lora_embedding_A.<n>`` on an embedding); other names are the same in both."""
    match = _LK_ADAPTER.match(name)
    if not match:
        return name
    module = lk_model.get_submodule(match["module"])
    if module.is_embedding:
        return f"{match['module']}.lora_embedding_{match['ab']}.{match['adapter']}"
    return f"{match['module']}.lora_{match['ab']}.{match['adapter']}.weight"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    pool's waiting costs seconds per step: run these tests on one thread, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
