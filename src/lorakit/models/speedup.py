"""What makes a LoRA-wrapped transformers model train fast, in one place: lorakit's trainer applies it
(`lorakit.train.fast`, `lorakit.train.setup`), and `speedup` applies it to a model that another
training loop trains (transformers' Trainer, TRL's SFTTrainer, a user's own loop).

- precision (`resolve_precision`): bf16 where the hardware multiplies bf16 natively, else fp32. In
  bf16 the frozen base weights are stored in bf16 (half the memory, no cast per step) and the
  forward runs under bf16 autocast (`autocast_for`); the adapter weights, their gradients and
  so the optimizer's state stay fp32;
- the fused LoRA node (`lorakit.kernels.fused`): the default path of every lorakit LoRA layer;
- `speed_up`: lorakit's training attention and the fused RMSNorm for Llama-family models
  (`lorakit.models.attention`, `lorakit.models.norms`), gradient checkpointing, torch.compile;
- the loss head on label positions only (`label_loss_sum`, `lorakit.kernels.loss`): prompt and
  padding positions never reach the vocabulary, and no (B, T, V) logits are made;
- packed batches (`boundaries`): a one-row batch of examples end to end, as transformers'
  ``DataCollatorWithFlattening`` makes it (``position_ids`` that restart at 0 for each example,
  and ``cu_seq_lens_q`` when asked for), attended to example by example.

`speedup(model)` applies them all to a model in place and makes its forward take the fast paths:
with ``labels`` in training mode the loss comes from the final hidden states of the label positions
(``logits`` is then None), divided as transformers' ``ForCausalLMLoss`` divides it (by
``num_items_in_batch`` when given, as the Trainer does under gradient accumulation, else by the
label tokens), so the loss is the plain forward's. Without labels, or in eval mode, the forward
returns the logits as before. Tests compare both with the plain model through the Trainer, padded
and packed (tests/models/test_speedup.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lorakit.errors import ConfigError
from lorakit.kernels.fused import FusedLayer
from lorakit.kernels.precision import native_bf16
from lorakit.layer import LoraLayer
from lorakit.models.attention import ATTENTION, LAYOUT_KEY, use_lorakit_attention, varlen_inputs
from lorakit.models.family import in_llama_family, unwrap
from lorakit.models.heads import (
    IGNORE_INDEX, FusedLMHeadOutput, fused_head, label_loss_sum, mean_label_loss, plain_head, trl_fused_head,
)
from lorakit.models.norms import use_fused_norms

__all__ = ["ATTENTION_CHOICES", "IGNORE_INDEX", "speedup", "speed_up", "resolve_precision", "autocast_for",
           "label_loss_sum", "boundaries", "plain_head", "FusedLMHeadOutput"]

ATTENTION_CHOICES = ("auto", "lorakit", "sdpa", "eager")


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 where the hardware multiplies bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast_for(precision: str, device: torch.device) -> Callable[[], Any]:
    """A context-manager factory: bf16 autocast (so the fp32 adapter runs in bf16 too), or nothing."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _decoder_layers(model) -> list[nn.Module]:
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    return list(getattr(decoder, "layers", []))


def speed_up(model, *, attention: str = "auto", fused_norms: bool = True, gradient_checkpointing: bool = False,
             compile: bool = False) -> list[str]:
    """The trainer's attention, norm, checkpointing and compile settings on a (LoRA-wrapped) transformers model.

    - attention: lorakit's training attention for Llama-family models ("auto"; "lorakit" refuses
      other models), or the model's own ("sdpa", "eager");
    - fused RMSNorm: one autograd node instead of eight, for Llama-style norms;
    - gradient checkpointing: keep only each layer's input and recompute the rest in the backward;
    - torch.compile: each decoder layer compiled once for every batch length (dynamic shapes;
      lorakit's attention runs eagerly inside); on a 2-core CPU it runs no faster than the eager
      step after 20-40 s of compiling (bench/compile.py), so it is for GPUs.

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
    quantized = [m for m in model.modules() if isinstance(m, LoraLayer) and m.quantized is not None]
    if quantized:
        kind = quantized[0].quantized.precision(quantized[0].base_layer)
        notes.append(f"fused LoRA node: off for the {len(quantized)} layers on the {kind} base (bitsandbytes' layer "
                     "dequantizes W and computes W x itself; the adapter's part is added after it)")
    if compile:
        layers = _decoder_layers(model)
        if not layers:
            raise ConfigError("compile: found no decoder layers to compile in this model; turn it off")
        for layer in layers:
            layer.compile(dynamic=True)  # the batches' lengths change from step to step: one compile, not one per length
        notes.append(f"torch.compile: {len(layers)} decoder layers (the first steps include compiling)")
    return notes


def boundaries(position_ids: torch.Tensor) -> torch.Tensor | None:
    """The example boundaries [0, l0, l0+l1, ..., T] (int32) of a one-row batch whose
    ``position_ids`` (1, T) count 0, 1, 2, ... within each example (transformers'
    ``DataCollatorWithFlattening``), or None when they do not describe two or more such examples."""
    if position_ids.dim() != 2 or position_ids.shape[0] != 1 or position_ids.shape[1] < 2:
        return None
    pos = position_ids[0]
    steps = pos[1:] - pos[:-1]
    restarts = pos[1:] == 0
    if int(pos[0]) != 0 or not bool(((steps == 1) | restarts).all()) or not bool(restarts.any()):
        return None
    starts = torch.cat([pos.new_zeros(1), restarts.nonzero().squeeze(1) + 1, pos.new_tensor([len(pos)])])
    return starts.to(torch.int32)


@dataclass
class _Settings:
    """What `speedup` switched on, read by a patched forward (an attribute of its module, so that a
    deep copy of the model carries its own)."""

    bf16: bool
    """Forwards under bf16 autocast, on the device the module is on at the call."""
    loss_head: bool
    varlen: bool
    chain: tuple = (None,)
    """What each of speedup's forwards on this module wraps, outermost first: ``chain[0]`` is the
    instance-level forward that was there when speedup last ran (another library's patch), else
    None (the class's). Another library can wrap speedup's forward and speedup wrap that again
    (TRL's fused LM head, installed when SFTTrainer is built, between two calls): the inner one,
    reached through the other library's, then calls ``chain[1]``, not the outer one's again."""
    depth: int = 0
    """How many of speedup's forwards on this module are running (nested calls, see ``chain``)."""

    @property
    def wrapped(self) -> Callable | None:
        return self.chain[0]


def _wrapped_here(settings: _Settings) -> Callable | None:
    """What the running speedup forward wraps (``chain`` at its depth)."""
    level = settings.depth - 1
    return settings.chain[level] if 0 <= level < len(settings.chain) else None


def _call_plain(module: nn.Module, settings: _Settings, args, kwargs):
    forward = _wrapped_here(settings)
    if forward is None:
        forward = functools.partial(type(module).forward, module)
    return forward(*args, **kwargs)


@contextlib.contextmanager
def _entered(settings: _Settings):
    settings.depth += 1
    try:
        yield
    finally:
        settings.depth -= 1


def _autocast(settings: _Settings, module: nn.Module):
    device = next(module.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=settings.bf16)


def _with_layout(kwargs: dict) -> dict:
    """A packed one-row batch's keywords with the layout lorakit's attention reads, built once here
    (not in every layer): from ``cu_seq_lens_q`` when the collator gave it (transformers'
    ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``, TRL's padding-free batches),
    else from ``position_ids`` that restart at 0 (``DataCollatorWithFlattening``)."""
    if LAYOUT_KEY in kwargs:
        return kwargs
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None:
        cu = boundaries(kwargs["position_ids"])
    if cu is None:
        return kwargs
    tokens = next(kwargs[k] for k in ("input_ids", "inputs_embeds", "position_ids") if kwargs.get(k) is not None)
    return kwargs | varlen_inputs(cu.to(tokens.device))


def _lm_forward(self, *args, labels=None, num_items_in_batch=None, shift_labels=None, fused_lm_head=False,
                **kwargs):
    """The causal LM's forward with the fast paths that `speedup` switched on (see the module's doc).
    ``fused_lm_head=True`` is TRL's call for its fused LM head (``add_fused_lm_head``, installed
    before this forward): served here on the label positions only when `_trl_fused_head` says it
    computes the same, else passed on to TRL's."""
    settings: _Settings = self._lorakit_speedup
    if len(args) == 1 and "input_ids" not in kwargs:
        kwargs["input_ids"], args = args[0], ()
    with _entered(settings), _autocast(settings, self):
        if settings.varlen and not args:
            kwargs = _with_layout(kwargs)
        targets = labels if shift_labels is None else shift_labels
        fast = settings.loss_head and not args and targets is not None
        trl = trl_fused_head(self, _wrapped_here(settings)) if fused_lm_head and fast else None
        if not (trl is not None or (fast and self.training and not fused_lm_head)):
            extra = {k: v for k, v in (("labels", labels), ("num_items_in_batch", num_items_in_batch),
                                       ("shift_labels", shift_labels), ("fused_lm_head", fused_lm_head or None))
                     if v is not None}
            return _call_plain(self, settings, args, kwargs | extra)
        kwargs.pop("logits_to_keep", None)
        kwargs["use_cache"] = False if trl is not None else kwargs.get("use_cache", False)  # TRL's head forces it
        out = self.get_decoder()(**kwargs)
        if trl is not None:
            return fused_head(self, out.last_hidden_state, labels, shift_labels, num_items_in_batch, trl)
        loss = mean_label_loss(self, out.last_hidden_state, labels, shift_labels, num_items_in_batch)
        return CausalLMOutputWithPast(loss=loss, logits=None, hidden_states=out.hidden_states,
                                      attentions=out.attentions)


def _decoder_forward(self, *args, **kwargs):
    """The decoder's forward under the same precision and packed layout: what runs when a caller
    calls the decoder itself (TRL's fused LM head does)."""
    settings: _Settings = self._lorakit_speedup
    with _entered(settings), _autocast(settings, self):
        if settings.varlen and not args:
            kwargs = _with_layout(kwargs)
        return _call_plain(self, settings, args, kwargs)


def _is_ours(forward) -> bool:
    return getattr(getattr(forward, "__func__", None), "lorakit_speedup", False)


def _patch_forward(module: nn.Module, fast: Callable, settings: _Settings) -> None:
    current = vars(module).get("forward")
    previous: _Settings | None = vars(module).get("_lorakit_speedup")
    if previous is None:
        settings.chain = (current,)
    elif _is_ours(current):  # applied again: keep what it wrapped
        settings.chain = previous.chain
    else:  # another library wrapped speedup's forward: wrap it, and the inner forward keeps its own
        settings.chain = (current, *previous.chain)
    module._lorakit_speedup = settings

    @functools.wraps(type(module).forward)  # the class's signature (generate and the Trainer read the arguments)
    def forward(self, *args, **kwargs):
        return fast(self, *args, **kwargs)

    forward.lorakit_speedup = True
    module.forward = types.MethodType(forward, module)  # bound, no closure: a deep copy binds it to the copy


def _serve_later_heads(module: nn.Module, args, kwargs) -> None:
    """A forward pre-hook on the causal LM: when a ``fused_lm_head=True`` call finds speedup's forward
    wrapped by another (TRL's fused LM head, installed when SFTTrainer is built after speedup ran),
    speedup wraps it again, so that from the next call on it serves the head on the label positions
    (this call runs TRL's head, which computes the same on every position)."""
    if not kwargs.get("fused_lm_head") or _is_ours(vars(module).get("forward")):
        return None
    settings: _Settings = module._lorakit_speedup
    _patch_forward(module, _lm_forward, dataclasses.replace(settings, depth=0))
    if trl_fused_head(module, module._lorakit_speedup.wrapped) is not None:
        print("lorakit.speedup: TRL's fused LM head, installed after speedup, is served on the label positions "
              "from the next step on (call speedup(model) after building the trainer to have it from the first)",
              flush=True)
    return None


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Frozen floating-point parameters to ``dtype`` (trainable ones keep theirs), and 4-bit layers
    made to dequantize to ``dtype`` and multiply in it; returns how many tensors were cast."""
    count = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            count += 1
    for m in model.modules():
        if isinstance(m, LoraLayer) and m.quantized is not None and hasattr(m.base_layer, "compute_dtype"):
            m.base_layer.compute_dtype = dtype
    return count


def speedup(model: nn.Module, *, bf16: bool | None = None, attention: str = "auto", fused_norms: bool = True,
            loss_head: bool = True, packed: bool = True, gradient_checkpointing: bool = False,
            compile: bool = False, verbose: bool = True) -> nn.Module:
    """Make a LoRA-wrapped transformers model (`lorakit.get_peft_model`) train fast in any training loop.

    Applies what lorakit's trainer applies (see the module's doc): ``bf16`` None decides as the
    trainer does (bf16 where the hardware runs it natively), True or False forces it; ``attention``
    as in `speed_up`; ``loss_head``: the loss on label positions only, without logits; ``packed``:
    one-row batches of several examples attended to example by example. Parts that do not apply
    to the model's architecture are left out. Prints one line saying what applies (``verbose``),
    records the same lines in ``model.lorakit_speedup``, and returns ``model`` itself.
    """
    if not isinstance(model, nn.Module) or not hasattr(unwrap(model), "config"):
        raise ConfigError(f"speedup: expected a transformers model (wrapped by get_peft_model), "
                          f"got {type(model).__name__}")
    lm = unwrap(model)
    params = list(model.parameters())
    if not params:
        raise ConfigError("speedup: the model has no parameters")
    device = params[0].device
    notes: list[str] = []
    # a layer on a quantized base runs its base layer's own kernel (`speed_up` says so)
    layers = sum(isinstance(m, FusedLayer) and getattr(m, "quantized", None) is None for m in model.modules())
    notes.append(f"fused LoRA layers: {layers}" if layers else
                 "fused LoRA layers: none (wrap the model with lorakit's get_peft_model for them)")
    precision = resolve_precision("auto" if bf16 is None else ("bf16" if bf16 else "fp32"), device)
    if precision == "bf16":
        cast = _cast_frozen(model, torch.bfloat16)
        notes.append(f"precision: bf16 frozen weights ({cast} tensors cast), fp32 adapters, bf16 autocast")
    else:
        notes.append("precision: fp32" + (" (no native bf16 here; bf16=True forces it)" if bf16 is None else ""))
    notes += speed_up(model, attention=attention, fused_norms=fused_norms,
                      gradient_checkpointing=gradient_checkpointing, compile=compile)
    llama = in_llama_family(model)
    head = loss_head and llama and plain_head(lm)
    varlen = packed and lm.config._attn_implementation == ATTENTION
    if head:
        notes.append("loss head: label positions only, no logits (training forwards with labels)")
    elif loss_head:
        notes.append(f"loss head: the model's own ({lm.config.model_type} is not supported)")
    if varlen:
        notes.append("packed batches: attended example by example (DataCollatorWithFlattening)")
    elif packed:
        notes.append("packed batches: the model's own attention mask")
    if head or varlen or precision == "bf16":
        _patch_forward(lm, _lm_forward, _Settings(bf16=precision == "bf16", loss_head=head, varlen=varlen))
        if head and _serve_later_heads not in lm._forward_pre_hooks.values():  # once, whatever the calls
            lm.register_forward_pre_hook(_serve_later_heads, with_kwargs=True)
        decoder = lm.get_decoder() if hasattr(lm, "get_decoder") else None
        if isinstance(decoder, nn.Module) and decoder is not lm:
            _patch_forward(decoder, _decoder_forward, _Settings(bf16=precision == "bf16", loss_head=False,
                                                                varlen=varlen))
    model.lorakit_speedup = notes
    if verbose:
        kind = "Llama family" if llama else f"{lm.config.model_type}: not Llama-family, plain path elsewhere"
        print(f"lorakit.speedup ({kind}): " + "; ".join(notes), flush=True)
    return model
