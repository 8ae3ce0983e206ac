"""`estimate`: what one LoRA configuration on one model trains, weighs on disk and needs in memory."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from typing import Any

from lorakit.errors import ConfigError
from lorakit.plan.costs import adapter_tensors, safetensors_size, trainable_params
from lorakit.plan.memory import MemoryEstimate, estimate_memory
from lorakit.plan.shapes import ModelShape
from lorakit.plan.sources import load_shape
from lorakit.plan.targets import LoraSpec, TargetedModule, resolve_targets

__all__ = ["Estimate", "estimate"]


@dataclass(frozen=True)
class Estimate:
    """The cost of one LoRA configuration on one model (all sizes in bytes)."""

    shape: ModelShape
    spec: LoraSpec
    targets: tuple[TargetedModule, ...]
    trainable_params: int  # what get_peft_model makes trainable
    base_params: int  # the frozen model
    adapter_bytes_fp32: int  # adapter_model.safetensors as save_pretrained writes it (fp32)
    adapter_bytes_bf16: int  # the same file with bf16 tensors
    memory: MemoryEstimate

    @property
    def all_params(self) -> int:
        """Base plus adapter, as PEFT's print_trainable_parameters counts "all params"."""
        return self.base_params + self.trainable_params

    @property
    def trainable_percent(self) -> float:
        return 100 * self.trainable_params / self.all_params

    def peft_line(self) -> str:
        """The line print_trainable_parameters() prints for this configuration."""
        return (f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,}"
                f" || trainable%: {self.trainable_percent:.4f}")

    def modules_summary(self) -> list[dict[str, Any]]:
        """One row per distinct module (by its path inside a block): count, shape, rank, params."""
        rows: dict[tuple, dict[str, Any]] = {}
        prefix = self.shape.layers_prefix + "."
        for t in self.targets:
            local = t.name[len(prefix):].split(".", 1)[1] if t.name.startswith(prefix) else t.name
            key = (local, t.r, t.lora_alpha)
            row = rows.setdefault(key, dict(module=local, count=0, in_features=t.module.in_features,
                                            out_features=t.module.out_features, r=t.r,
                                            lora_alpha=t.lora_alpha, scale=t.scale, params=0))
            row["count"] += 1
            row["params"] += t.params(self.spec.use_dora)
        return list(rows.values())

    def to_dict(self) -> dict[str, Any]:
        spec = {f.name: getattr(self.spec, f.name) for f in fields(self.spec)}
        for key, value in spec.items():
            if isinstance(value, tuple):
                spec[key] = list(value)
        return {
            "model": self.shape.name, "config": spec,
            "targeted_modules": len(self.targets), "modules": self.modules_summary(),
            "trainable_params": self.trainable_params, "base_params": self.base_params,
            "all_params": self.all_params, "trainable_percent": round(self.trainable_percent, 6),
            "adapter_bytes": {"fp32": self.adapter_bytes_fp32, "bf16": self.adapter_bytes_bf16},
            "memory": self.memory.to_dict(),
        }


_TRAINING_KEYS = ("batch_size", "seq_len", "dtype", "device", "gradient_checkpointing", "autocast",
                  "head_on_labels", "label_fraction", "fused_kernels", "memory_gb", "gpus", "strategy",
                  "quantize")


def estimate(model: str | os.PathLike | ModelShape | None = None, config: Any = None, *,
             batch_size: int = 4, seq_len: int = 512, dtype: str = "bfloat16",
             device: str = "cpu", gradient_checkpointing: bool = False, autocast: bool = True,
             head_on_labels: bool | None = None, label_fraction: float = 1.0,
             fused_kernels: bool | None = None, memory_gb: float | None = None, gpus: int = 1,
             strategy: str = "ddp", quantize: str | None = None, **lora: Any) -> Estimate:
    """Parameters, adapter size and training memory of a LoRA configuration, from shapes alone.

    ``model``: a model directory, config.json, .gguf file, built-in name (``"Llama-3-8B"``), a
    `ModelShape`, or None for lorakit's default model. ``config``: a lorakit or PEFT LoraConfig
    (or a dict); keyword arguments (``r=16, lora_alpha=16, target_modules=[...]``, any LoraConfig
    field the planner uses) override it. Defaults are PEFT's (r=8, lora_alpha=8, the model
    type's default targets).

    Trainable parameters: sum over targeted modules of ``r * (in + out)`` (plus ``out`` for
    DoRA), exactly what ``get_peft_model`` makes trainable. Adapter size: the exact byte size of
    ``adapter_model.safetensors`` (see `costs`). Training memory, in bytes (b: bytes per value of
    ``dtype``; every term in full in `lorakit.plan.memory`):

        total       = weights + adapter + activations + logits + allocator + overhead + distributed
                      + dequantization
        weights     = base_params * b, or with ``quantize``: codes + constants + unquantized
        adapter     = trainable_params * (16 + a)  fp32 weights, gradients, AdamW's two moments;
                                                   a = b under autocast: the weights' b copies
        activations = batch_size * seq_len * per_token   what autograd keeps (per block: norm
                                                   inputs, attention q/k/v/out (and lorakit's
                                                   attention its probabilities), MLP outputs;
                                                   per adapted module: its input and x·A, in b
                                                   under autocast, else in fp32)
        logits      = min(labels, 1024) * vocab * (4 + b) + 2 * labels * hidden * b, labels =
                      ceil(batch_size * seq_len * label_fraction)
                                                   (head on label positions only, in chunks), or
                      batch_size * seq_len * vocab * (b + 12)   (head on every position)
        allocator   = 0.35 * activations (cpu: what glibc's malloc keeps), 0 (cuda)
        overhead    = 0.5 GiB (cpu) or 1 GiB (cuda)
        distributed = 0 on one process (`lorakit.plan.sharding` for several)
        dequantization = 0, or with ``quantize`` the largest layer's weight dequantized to b

    The defaults describe ``lorakit train``. ``autocast``: the forward runs under
    ``torch.autocast`` in ``dtype`` over fp32 adapters, as lorakit's trainer does in bf16; False
    for a model cast to ``dtype`` and run without it (PEFT's usual bf16 set-up).
    ``head_on_labels``: the output head runs on the label positions only, as lorakit's trainer
    does on Llama-family models (None: decide by the model type, as the trainer does); False
    for a model called with ``labels=``, which computes logits at every position.
    ``fused_kernels``: lorakit's attention and fused RMSNorm, which the trainer uses on the same
    models (None: as ``head_on_labels``); False for transformers' own.
    ``label_fraction``: the share of a batch's positions that are prediction targets (1.0 for
    plain text; for chat data with assistant-only labels, the answers' share of the tokens);
    it counts only when the head runs on label positions only.

    ``gpus``: processes, one per GPU (or CPU processes), each with ``batch_size`` examples a
    micro-step, as ``lorakit train --nproc``; ``strategy``: "ddp" (each device holds the whole
    frozen model) or "fsdp" (FSDP2 shards it). With ``gpus`` > 1 the memory is per device.

    ``quantize``: "nf4", "fp4" or "int8", a base whose blocks' linear layers are stored in 4 or 8
    bits by bitsandbytes (QLoRA), as ``lorakit train --quantize``; ``dtype`` is then the compute
    dtype and that of the embedding, norms and head (`lorakit.plan.quantization`). None: the
    whole base in ``dtype``.

    ``memory.fits`` compares the total with ``memory_gb`` (GiB), when given (on a CPU the
    ``gpus`` processes share it).
    """
    known = {f.name for f in fields(LoraSpec)}
    unknown = sorted(set(lora) - known)
    if unknown:
        raise ConfigError(f"estimate() got unknown settings {unknown}; LoRA settings: "
                          f"{', '.join(sorted(known))}; training: {', '.join(_TRAINING_KEYS)}")
    spec = LoraSpec.from_config(config) if config is not None else LoraSpec()
    if lora:
        spec = replace(spec, **lora)
    shape = load_shape(model)
    targets = resolve_targets(shape, spec)
    trainable = trainable_params(targets, spec.use_dora)
    tensors = adapter_tensors(targets, spec.use_dora, spec.target_modules)
    memory = estimate_memory(shape, targets, trainable, lora_dropout=spec.lora_dropout,
                             batch_size=batch_size, seq_len=seq_len, dtype=dtype, device=device,
                             gradient_checkpointing=gradient_checkpointing, autocast=autocast,
                             head_on_labels=head_on_labels, label_fraction=label_fraction,
                             fused_kernels=fused_kernels, memory_gb=memory_gb, gpus=gpus,
                             strategy=strategy, use_dora=spec.use_dora, quantize=quantize)
    return Estimate(shape=shape, spec=spec, targets=tuple(targets), trainable_params=trainable,
                    base_params=shape.total_params,
                    adapter_bytes_fp32=safetensors_size(tensors, "F32"),
                    adapter_bytes_bf16=safetensors_size(tensors, "BF16"), memory=memory)
