"""From a transformers config (a config.json's fields) to a `ModelShape`, one builder per family.

Each builder writes down, for one architecture, the adaptable modules of a block with their
shapes, and every other parameter, exactly as transformers builds the model; the tests compare
each against the real model built on the meta device. The config is first completed with the
defaults of its transformers config class (``AutoConfig.for_model``), so a partial config.json
means what it means to transformers.
"""

from __future__ import annotations

from typing import Any, Callable

from lorakit.errors import ConfigError
from lorakit.plan.shapes import ModelShape, ModuleShape

__all__ = ["shape_from_config", "SUPPORTED_MODEL_TYPES"]

# PEFT 0.21's default target_modules per model_type (used when target_modules is None).
_PEFT_DEFAULT_TARGETS = {
    "llama": ("q_proj", "v_proj"), "mistral": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"), "qwen3": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"), "gemma2": ("q_proj", "v_proj"),
    "gemma3_text": ("q_proj", "v_proj"), "gpt2": ("c_attn",), "phi3": (),
}
# Fields a config can't do without (the rest have sensible class defaults).
_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_DROPPED = ("model_type", "quantization_config", "transformers_version", "architectures")


def shape_from_config(config: dict[str, Any], *, name: str, source: str) -> ModelShape:
    """The `ModelShape` of the model a config.json describes; ``source`` names it in errors."""
    model_type = config.get("model_type")
    if not model_type:
        raise ConfigError(f"{source}: no 'model_type' field; a transformers config.json names "
                          "its architecture there (e.g. \"model_type\": \"llama\")")
    builder = _BUILDERS.get(model_type)
    if builder is None:
        raise ConfigError(
            f"{source}: model_type {model_type!r} is not one the planner knows; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (or pass a built-in shape name)")
    cfg = _complete(model_type, config, source)
    missing = [key for key in _REQUIRED if getattr(cfg, key, None) in (None, 0)]
    if missing:
        raise ConfigError(f"{source}: missing {', '.join(missing)}; the planner needs them to "
                          "count parameters")
    return builder(cfg, name=name, source=source)


def _complete(model_type: str, config: dict[str, Any], source: str):
    from transformers import AutoConfig  # configs only: no model code is imported

    fields = {k: v for k, v in config.items() if k not in _DROPPED}
    try:
        return AutoConfig.for_model(model_type, **fields)
    except (TypeError, ValueError, KeyError) as err:
        raise ConfigError(f"{source}: transformers rejects this {model_type} config: {err}") from err


def _dims(cfg) -> tuple[int, int, int, int, int, int, int]:
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    return hidden, inter, cfg.num_hidden_layers, heads, kv_heads, head_dim, cfg.vocab_size


def _llama_like(cfg, *, name: str, source: str, qkv_bias: bool, o_bias: bool, mlp_bias: bool,
                norms: int, qk_norm: bool, scores_bytes: int = 0) -> ModelShape:
    """Llama's block and its relatives: q/k/v/o attention (grouped KV heads) and a gated MLP."""
    h, i, layers, heads, kv_heads, hd, vocab = _dims(cfg)
    q, kv = heads * hd, kv_heads * hd
    block = (
        ModuleShape("self_attn.q_proj", h, q, qkv_bias, "attention", roles=("q_proj",)),
        ModuleShape("self_attn.k_proj", h, kv, qkv_bias, "attention", roles=("k_proj",)),
        ModuleShape("self_attn.v_proj", h, kv, qkv_bias, "attention", roles=("v_proj",)),
        ModuleShape("self_attn.o_proj", q, h, o_bias, "attention", roles=("o_proj",)),
        ModuleShape("mlp.gate_proj", h, i, mlp_bias, "mlp", roles=("gate_proj",)),
        ModuleShape("mlp.up_proj", h, i, mlp_bias, "mlp", roles=("up_proj",)),
        ModuleShape("mlp.down_proj", i, h, mlp_bias, "mlp", roles=("down_proj",)),
    )
    return ModelShape(
        name=name, model_type=cfg.model_type, source=source, hidden_size=h,
        intermediate_size=i, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_dim=hd, vocab_size=vocab, tie_word_embeddings=bool(cfg.tie_word_embeddings),
        layers_prefix="model.layers", block=block,
        block_other_params=norms * h + (2 * hd if qk_norm else 0),  # RMSNorm weights
        embedding=ModuleShape("model.embed_tokens", vocab, h, group="embedding", kind="embedding"),
        head=ModuleShape("lm_head", h, vocab, group="head"),
        other_params=h,  # the final norm
        default_targets=_PEFT_DEFAULT_TARGETS[cfg.model_type],
        max_positions=getattr(cfg, "max_position_embeddings", None),
        norms_per_block=norms, qk_norm=qk_norm, attention_scores_bytes=scores_bytes,
    )


def _phi3(cfg, *, name: str, source: str) -> ModelShape:
    """Phi-3: fused qkv_proj and gate_up_proj."""
    h, i, layers, heads, kv_heads, hd, vocab = _dims(cfg)
    block = (
        ModuleShape("self_attn.qkv_proj", h, (heads + 2 * kv_heads) * hd, roles=("q_proj", "k_proj", "v_proj")),
        ModuleShape("self_attn.o_proj", heads * hd, h, roles=("o_proj",)),
        ModuleShape("mlp.gate_up_proj", h, 2 * i, group="mlp", roles=("gate_proj", "up_proj")),
        ModuleShape("mlp.down_proj", i, h, group="mlp", roles=("down_proj",)),
    )
    return ModelShape(
        name=name, model_type="phi3", source=source, hidden_size=h, intermediate_size=i,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=hd,
        vocab_size=vocab, tie_word_embeddings=bool(cfg.tie_word_embeddings),
        layers_prefix="model.layers", block=block, block_other_params=2 * h,
        embedding=ModuleShape("model.embed_tokens", vocab, h, group="embedding", kind="embedding"),
        head=ModuleShape("lm_head", h, vocab, group="head"), other_params=h,
        default_targets=_PEFT_DEFAULT_TARGETS["phi3"],
        max_positions=getattr(cfg, "max_position_embeddings", None),
    )


def _gpt2(cfg, *, name: str, source: str) -> ModelShape:
    """GPT-2: Conv1D layers (weights stored (in, out)), LayerNorms with bias, learned positions."""
    h, layers, heads, vocab = cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.vocab_size
    inner = cfg.n_inner or 4 * h
    block = (
        ModuleShape("attn.c_attn", h, 3 * h, True, kind="conv1d", roles=("q_proj", "k_proj", "v_proj")),
        ModuleShape("attn.c_proj", h, h, True, kind="conv1d", roles=("o_proj",)),
        ModuleShape("mlp.c_fc", h, inner, True, "mlp", kind="conv1d", roles=("gate_proj", "up_proj")),
        ModuleShape("mlp.c_proj", inner, h, True, "mlp", kind="conv1d", roles=("down_proj",)),
    )
    return ModelShape(
        name=name, model_type="gpt2", source=source, hidden_size=h, intermediate_size=inner,
        num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=h // heads,
        vocab_size=vocab, tie_word_embeddings=bool(cfg.tie_word_embeddings),
        layers_prefix="transformer.h", block=block,
        block_other_params=2 * 2 * h,  # ln_1, ln_2: weight and bias
        embedding=ModuleShape("transformer.wte", vocab, h, group="embedding", kind="embedding"),
        head=ModuleShape("lm_head", h, vocab, group="head"),
        other_params=cfg.n_positions * h + 2 * h,  # wpe and ln_f
        default_targets=_PEFT_DEFAULT_TARGETS["gpt2"], max_positions=cfg.n_positions,
        mlp_saved=2,  # c_fc's output and the GELU's
    )


def _family(**flags) -> Callable[..., ModelShape]:
    def build(cfg, *, name: str, source: str) -> ModelShape:
        resolved = {k: (getattr(cfg, v, False) or False) if isinstance(v, str) else v
                    for k, v in flags.items()}
        return _llama_like(cfg, name=name, source=source, **resolved)
    return build


# A string flag names the config field that decides it (e.g. Llama's attention_bias).
_BUILDERS: dict[str, Callable[..., ModelShape]] = {
    "llama": _family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias",
                     norms=2, qk_norm=False),
    "mistral": _family(qkv_bias=False, o_bias=False, mlp_bias=False, norms=2, qk_norm=False),
    "qwen2": _family(qkv_bias=True, o_bias=False, mlp_bias=False, norms=2, qk_norm=False),
    "qwen3": _family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
                     norms=2, qk_norm=True),
    "gemma": _family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
                     norms=2, qk_norm=False),
    # Gemma 2's soft-capped attention runs eagerly: it keeps its scores (measured 8 bytes per
    # head and key position).
    "gemma2": _family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
                      norms=4, qk_norm=False, scores_bytes=8),
    "gemma3_text": _family(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False,
                           norms=4, qk_norm=True),
    "phi3": _phi3,
    "gpt2": _gpt2,
}
SUPPORTED_MODEL_TYPES = tuple(_BUILDERS)
