"""`make_plan`: the recommendation for a task beside the lesson's three presets, all costed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lorakit.config import PRESETS
from lorakit.plan.advice import Recommendation, recommend
from lorakit.plan.estimation import Estimate, estimate
from lorakit.plan.shapes import ModelShape
from lorakit.plan.sources import load_shape
from lorakit.plan.strategies import StrategyAdvice, advise_strategy

__all__ = ["Plan", "make_plan", "preset_estimates"]


@dataclass(frozen=True)
class Plan:
    """What `lorakit plan` shows: the model, the advice, and every option's cost."""

    shape: ModelShape
    recommendation: Recommendation
    presets: dict[str, Estimate]  # "conservative", "balanced", "max_capacity"
    memory_gb: float | None
    strategy: StrategyAdvice  # the recommendation per device under DDP and FSDP2, and which to use

    @property
    def options(self) -> dict[str, Estimate]:
        """The recommendation first, then the presets: the columns of the table."""
        return {"recommended": self.recommendation.estimate, **self.presets}

    def to_dict(self) -> dict[str, Any]:
        shape = self.shape
        return {
            "model": {"name": shape.name, "source": shape.source, "model_type": shape.model_type,
                      "layers": shape.num_layers, "hidden_size": shape.hidden_size,
                      "intermediate_size": shape.intermediate_size, "heads": shape.num_heads,
                      "kv_heads": shape.num_kv_heads, "head_dim": shape.head_dim,
                      "vocab_size": shape.vocab_size, "tied_embeddings": shape.tie_word_embeddings,
                      "params": shape.total_params},
            "memory_gb": self.memory_gb,
            "quantize": self.recommendation.estimate.memory.quantize,
            "recommendation": self.recommendation.to_dict(),
            "presets": {name: est.to_dict() for name, est in self.presets.items()},
            "strategy": self.strategy.to_dict(),
        }


def preset_estimates(shape: ModelShape, **training: Any) -> dict[str, Estimate]:
    """The lesson's presets (lorakit.config.PRESETS) on ``shape``, their targets translated to
    the model's module names (Phi-3's qkv_proj stands for q/k/v)."""
    out = {}
    for name, settings in PRESETS.items():
        settings = dict(settings, target_modules=shape.target_names(settings["target_modules"]))
        out[name] = estimate(shape, **settings, **training)
    return out


def make_plan(model: str | os.PathLike | ModelShape | None, task: str, examples: int, *,
              memory_gb: float | None = None, device: str = "cpu", dtype: str = "bfloat16",
              seq_len: int = 512, batch_size: int = 4, gpus: int = 1, strategy: str = "ddp",
              quantize: str | None = None) -> Plan:
    """Recommend settings for ``task`` with ``examples`` examples on ``model`` and cost the
    recommendation and the three presets at the same sequence length, batch and dtype, per
    device of ``gpus`` processes sharing the model by ``strategy`` ("ddp" or "fsdp"; the batch
    is per process); then say which strategy suits the recommendation. ``quantize`` ("nf4",
    "fp4", "int8"): the frozen base's linear layers in 4 or 8 bits, as ``lorakit train
    --quantize`` (`lorakit.plan.quantization`); None: the whole base in ``dtype``."""
    shape = load_shape(model)
    training = dict(device=device, dtype=dtype, seq_len=seq_len, quantize=quantize)
    rec = recommend(task, examples, shape, memory_gb, **training, batch_size=batch_size,
                    gpus=gpus, strategy=strategy)
    presets = preset_estimates(shape, **training, batch_size=batch_size, memory_gb=memory_gb,
                               gpus=gpus, strategy=strategy)
    settings = rec.lora_config() | dict(batch_size=rec.batch_size,
                                        gradient_checkpointing=rec.gradient_checkpointing)
    advice = advise_strategy(shape, settings, gpus=gpus, strategy=strategy, memory_gb=memory_gb,
                             **training)
    return Plan(shape=shape, recommendation=rec, presets=presets, memory_gb=memory_gb,
                strategy=advice)
