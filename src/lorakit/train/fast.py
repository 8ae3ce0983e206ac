"""How the trainer sets a model up for speed, in one place (the trainer and bench/ both call it).

- attention: lorakit's training attention (`lorakit.kernels.attention`, switched on by
  `lorakit.models.attention`) for Llama-family models ("auto"), or the model's own ("sdpa", "eager");
- fused RMSNorm (`lorakit.kernels.norms`, swapped in by `lorakit.models.norms`) for Llama-style
  norms: one autograd node instead of eight;
- gradient checkpointing (optional): keep only each layer's input and recompute the rest in the
  backward, trading about a third more compute for most of the activation memory;
- torch.compile (optional): compiles each decoder layer once for every batch length (dynamic
  shapes; lorakit's attention runs eagerly inside); on a 2-core CPU it runs no faster than the
  eager step after 20-40 s of compiling (bench/compile.py), so it is for GPUs;
- AdamW with the fused (single-kernel) update where PyTorch has one for the device.

The fused LoRA layers (`lorakit.kernels.fused`) and the chunked loss head (`lorakit.kernels.loss`) need no
switch: they are the default path of every lorakit model.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError
from lorakit.models.attention import use_lorakit_attention
from lorakit.models.family import unwrap
from lorakit.models.norms import use_fused_norms
from lorakit.variants.loraplus import loraplus_param_groups

__all__ = ["ATTENTION_CHOICES", "make_optimizer", "speed_up"]

ATTENTION_CHOICES = ("auto", "lorakit", "sdpa", "eager")


def make_optimizer(params: list[torch.nn.Parameter], lr: float, weight_decay: float, *,
                   model: torch.nn.Module | None = None, loraplus_ratio: float | None = None) -> torch.optim.AdamW:
    """AdamW over ``params``; the fused implementation when every parameter is a floating tensor on
    CPU or CUDA (the same update, one kernel instead of about ten small ones per parameter).

    With ``loraplus_ratio`` (and the ``model`` that holds ``params``): LoRA+'s parameter groups
    (`lorakit.variants.loraplus`), B at ``lr * loraplus_ratio``, with ``weight_decay`` as LoRA+'s
    weight decay. Each group records ``lr_scale`` = its lr / ``lr``, so that a schedule that sets
    ``group["lr"] = lr_at(step) * group["lr_scale"]`` keeps the groups' ratios."""
    groups: list[dict] = [{"params": list(params), "lr": lr}]
    if loraplus_ratio is not None:
        if model is None:
            raise ConfigError("make_optimizer: LoRA+ (loraplus_ratio) needs the model, to tell A from B")
        groups = loraplus_param_groups(model, lr=lr, loraplus_lr_ratio=loraplus_ratio,
                                       loraplus_weight_decay=weight_decay)
        wanted = {id(p) for p in params}
        if {id(p) for g in groups for p in g["params"]} != wanted:
            raise ConfigError("make_optimizer: params must be the model's trainable parameters for LoRA+")
    for g in groups:
        g["lr_scale"] = g["lr"] / lr
    flat = [p for g in groups for p in g["params"]]
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in flat)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _decoder_layers(model) -> list[torch.nn.Module]:
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return list(getattr(decoder, "layers", []))


def speed_up(model, *, attention: str = "auto", fused_norms: bool = True, gradient_checkpointing: bool = False,
             compile: bool = False) -> list[str]:
    """Apply the trainer's speed settings to a (LoRA-wrapped) transformers model.

    Returns one line per setting that took effect or was not available, for the run's log.
    """
    if attention not in ATTENTION_CHOICES:
        raise ConfigError(f"attention={attention!r}: must be one of {', '.join(ATTENTION_CHOICES)}")
    base = unwrap(model)
    notes = []
    if attention in ("auto", "lorakit"):
        if use_lorakit_attention(base):
            notes.append("attention: lorakit (fused training attention)")
        elif attention == "lorakit":
            raise ConfigError(
                f"attention='lorakit' supports Llama-family models; this is {base.config.model_type!r}. "
                "Use attention='auto' to keep the model's own attention"
            )
        else:
            notes.append(f"attention: {base.config._attn_implementation} (the model's own)")
    else:
        base.config._attn_implementation = attention
        notes.append(f"attention: {attention}")
    if fused_norms:
        count = use_fused_norms(base)
        if count:
            notes.append(f"norms: {count} RMSNorm modules fused")
    if gradient_checkpointing:
        if not getattr(base, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing: {type(base).__name__} does not support it; turn it off")
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        notes.append("gradient checkpointing: on (each decoder layer recomputed in the backward)")
    if compile:
        layers = _decoder_layers(model)
        if not layers:
            raise ConfigError("compile: found no decoder layers to compile in this model; turn it off")
        for layer in layers:
            layer.compile(dynamic=True)  # the batches' lengths change from step to step: one compile, not one per length
        notes.append(f"torch.compile: {len(layers)} decoder layers (the first steps include compiling)")
    return notes
