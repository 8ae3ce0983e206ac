"""Which models lorakit's fast training paths understand, in one place.

The Llama family: a decoder whose logits are exactly ``lm_head(final hidden state)`` (so the loss
head may run on label positions only), whose positions come from ``position_ids`` and whose
masks transformers builds from them (so examples may be packed), with Llama-style attention and
RMSNorm (so lorakit's attention and norms apply). The trainer, the packing collator, the
attention switch and the planner's memory model all ask this one set.
"""

from __future__ import annotations

import torch.nn as nn

__all__ = ["LLAMA_FAMILY", "in_llama_family", "unwrap"]

LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "granite"})


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a (lorakit or PEFT) PeftModel, or ``model`` itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def in_llama_family(model: nn.Module) -> bool:
    return getattr(getattr(unwrap(model), "config", None), "model_type", None) in LLAMA_FAMILY
