"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

DoRA splits the adapted weight into a direction and a learned magnitude ``m`` (one per output
feature), and trains the direction with LoRA:

    W' = m * (W + s B A) / ||W + s B A||          row-wise: one norm per output feature i
    y  = (m / ||W + s B A||) * (x W^T + s * (x A^T) B^T) + bias

The norm is treated as a constant (detached from the graph, section 4.3 of the paper), so only
the numerator carries gradients. ``m`` starts at ``||W + s B A||`` (the adapter starts as the
base layer when B = 0). With dropout in training, PEFT feeds ``dropout(x)`` to the DoRA terms
and keeps the plain base output for ``x`` itself; lorakit does the same, for identical outputs:

    y  = x W^T + bias + (c - 1) * (x_d W^T) + c * s * (x_d A^T) B^T,    c = m / ||W + s B A||

**The norm without B A.** PEFT builds the full (out x in) matrix ``B A`` every step to take its
norm. Row i of ``W + s B A`` is ``w_i + s b_i A``, so its squared norm is

    ||w_i||^2 + 2 s b_i . (W A^T)_i + s^2 b_i (A A^T) b_i^T

which needs only ``||w_i||^2`` of the frozen W (cached until W changes), ``W A^T`` (out x r)
and ``A A^T`` (r x r). `weight_norm` computes it in fp32.

**Two forwards.** `forward` is the readable reference (PEFT's formula, autograd does the rest);
`fused_forward` runs the same sum as one autograd node (`_DoraLinear`): matrix products in the
compute dtype (autocast's, else the tensors'), no gradient for the frozen weight, in-place adds,
the dropout terms only when dropout is on. `merged_weight` and `unmerged_weight` are DoRA's merge
rule. `DORA` (the end of this module) registers them with `lorakit.plugins`, where `lorakit.layer`
and `lorakit.inject` find them by name. Tests:
tests/variants/test_dora.py (against PEFT, the reference and hand computations).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.layer import Adapter, LoraLayer
from lorakit import plugins
from lorakit.plugins import AdapterVariant, register_variant

__all__ = ["NAME", "DORA", "check_targets", "add_magnitude", "weight_norm", "forward", "fused_forward",
           "dora_linear", "merged_weight", "unmerged_weight"]

NAME = "dora"


# --------------------------------------------------------------------------- creation

def check_targets(found: list[tuple[str, nn.Module]]) -> None:
    """Refuse, in one error and before anything is wrapped, targets DoRA does not cover here."""
    quantized = [name for name, m in found if plugins.quantized_base(getattr(m, "base_layer", m)) is not None]
    if quantized:
        raise ConfigError(
            f"use_dora=True: lorakit does not yet run DoRA on a 4-bit or 8-bit base ({quantized[0]} and "
            f"{len(quantized) - 1} more layers are quantized); train plain LoRA on it (use_dora=False), or load "
            "the base unquantized (bf16) for DoRA"
        )
    embeddings = [name for name, m in found if isinstance(getattr(m, "base_layer", m), nn.Embedding)]
    if embeddings:
        raise ConfigError(
            f"use_dora=True: lorakit implements DoRA for Linear and Conv1D layers, not for the "
            f"embedding layers {embeddings}; remove them from target_modules (or add them with "
            "a second, plain LoRA adapter), or set use_dora=False"
        )


def _weight_out_in(layer: LoraLayer) -> torch.Tensor:
    """The base weight as (out, in) (a view: GPT-2's Conv1D stores it (in, out))."""
    w = layer.base_layer.weight
    return w.t() if getattr(layer, "fan_in_fan_out", False) else w


def add_magnitude(layer: LoraLayer, adapter_name: str) -> None:
    """Give the adapter its magnitude ``m = ||W + s B A||`` (out,), row-wise, and DoRA's rule.

    Computed once at creation from the adapter's initial A and B (so with random B, as
    ``init_lora_weights=False`` gives, the update is included), in fp32, as PEFT does."""
    a = layer.adapters[adapter_name]
    w = _weight_out_in(layer)
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        norm = torch.linalg.norm(w.float() + a.delta_weight().to(w.device), dim=1)  # (out,)
    a.lora_magnitude_vector = nn.Parameter(norm.to(a.lora_A.dtype))
    a.variant = NAME


# --------------------------------------------------------------------------- the norm

def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _row_sq_norms(adapter: Adapter, w: torch.Tensor) -> torch.Tensor:
    """``||w_i||^2`` of the frozen weight (out,), fp32, cached on the adapter until the weight
    changes: any in-place write bumps its version (merge and unmerge write that way), and a new
    tensor (``weight.data = ...``, a device move) has another address."""
    key = (_version(w), w.data_ptr(), w.device, w.dtype)
    cached = adapter.variant_cache.get("w_sq")
    if cached is not None and cached[0] == key and key[0] is not None:
        return cached[1]
    w_sq = w.float().pow(2).sum(1)  # (out,)
    adapter.variant_cache["w_sq"] = (key, w_sq)
    return w_sq


def weight_norm(layer: LoraLayer, adapter: Adapter) -> torch.Tensor:
    """``||W + s B A||`` per output feature (out,), fp32, detached, without forming B A:

        ||w_i + s b_i A||^2 = ||w_i||^2 + 2 s b_i . (W A^T)_i + s^2 b_i (A A^T) b_i^T
    """
    w = _weight_out_in(layer)
    s = adapter.scaling
    with torch.no_grad(), torch.autocast(w.device.type, enabled=False):
        a = adapter.lora_A.float()  # (r, in)
        b = adapter.lora_B.float()  # (out, r)
        # W A^T in W's own dtype (a bf16 W is not copied to fp32 every step; products accumulate
        # in fp32 and only the (out, r) result is rounded, as under autocast)
        wa = (w @ a.to(w.dtype).t()).float()  # (out, r)
        aa = a @ a.t()  # (r, r)
        sq = _row_sq_norms(adapter, w) + 2 * s * (b * wa).sum(1) + s * s * ((b @ aa) * b).sum(1)  # (out,)
        return sq.clamp_min_(0).sqrt_()


# --------------------------------------------------------------------------- the reference forward

def forward(layer: LoraLayer, adapter: Adapter, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward, added to ``result`` (the base output, with any earlier adapters):

        result + (c - 1) * base + c * s * B(A(x_d)),    c = m / ||W + s B A||  (detached)

    where base is ``result - bias`` (x_d = x: no dropout, or eval) or ``x_d W^T`` (dropout on).
    """
    a = adapter
    w = _weight_out_in(layer)  # (out, in)
    x = x.to(a.lora_A.dtype)
    c = (a.lora_magnitude_vector / weight_norm(layer, a)).view(1, -1)  # (1, out)
    if isinstance(a.lora_dropout, nn.Identity) or not layer.training:
        bias = layer.base_layer.bias
        base = result - bias if bias is not None else result  # (..., out)
    else:
        x = a.lora_dropout(x)  # (..., in)
        base = F.linear(x, w.to(x.dtype))  # (..., out)
    lora = F.linear(F.linear(x, a.lora_A), a.lora_B) * a.scaling  # (..., out)
    return result + (c - 1) * base + c * lora


# --------------------------------------------------------------------------- the fused forward

class _DoraLinear(torch.autograd.Function):
    """One node for ``y = (x - x_d) W^T + bias + c * z``, ``z = x_d W^T + s (x_d A^T) B^T``
    (x_d is x without dropout, so y = c * z + bias).

        forward    h = x_d A^T  (N, r);   z = x_d W^T;  z += s h B^T  (N, out)
                   y = z + (c - 1) * z  (+ (x - x_d) W^T)  + bias     (c - 1 stays exact in bf16)
        backward   gh = s * g (c B)  (N, r)
                   dB = s * c * (g^T h),  dA = gh^T x_d,  dm = sum_N(g * z) / ||W + s B A||
                   dx = g (c W) + gh A                                (no dropout)
                   dx = g W,  dx_d = g ((c - 1) W) + gh A             (dropout)
    """

    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, magnitude, norm, scaling):
        # x, x_d (N, in); weight (out, in); lora_a (r, in); lora_b (out, r); magnitude, norm (out,) fp32
        c = magnitude.detach().float() / norm  # (out,) fp32
        h = x_d @ lora_a.t()  # (N, r)
        z = x_d @ weight.t()  # (N, out)
        z.addmm_(h, lora_b.t(), alpha=scaling)
        same = x_d is x
        y = torch.addcmul(z, z, (c - 1).to(z.dtype))  # (N, out): c * z, z kept for dm
        if not same:
            y.addmm_(x - x_d, weight.t())
        if bias is not None:
            y.add_(bias)
        ctx.scaling, ctx.same_input = scaling, same
        need = ctx.needs_input_grad
        ctx.save_for_backward(x_d if need[4] else None, z if need[6] else None, h, weight,
                              lora_a, lora_b, c, norm)
        return y

    @staticmethod
    def backward(ctx, g):
        x_d, z, h, weight, lora_a, lora_b, c, norm = ctx.saved_tensors
        need_x, need_xd, _, need_bias, need_a, need_b, need_m = ctx.needs_input_grad[:7]
        s, dtype = ctx.scaling, g.dtype
        grad_x = grad_xd = grad_bias = grad_a = grad_b = grad_m = None
        sc = (c * s).unsqueeze(1)  # (out, 1)
        gh = g @ (lora_b * sc).to(dtype)  # (N, r)
        if need_b:
            grad_b = ((g.t() @ h) * sc).to(lora_b.dtype)  # (out, r)
        if need_a:
            grad_a = gh.t() @ x_d  # (r, in)
        if need_m:
            grad_m = (g * z).sum(0, dtype=torch.float32) / norm  # (out,)
        if ctx.same_input:
            if need_x:
                grad_x = g @ (weight * c.to(dtype).unsqueeze(1))  # (N, in)
                grad_x.addmm_(gh, lora_a)
        else:
            if need_x:
                grad_x = g @ weight  # (N, in)
            if need_xd:
                grad_xd = g @ (weight * (c - 1).to(dtype).unsqueeze(1))  # (N, in)
                grad_xd.addmm_(gh, lora_a)
        if need_bias:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, grad_m, None, None


def dora_linear(x: torch.Tensor, base: nn.Linear, adapter: Adapter, norm: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """The DoRA layer output (base included) as one autograd node, products in ``dtype``."""
    a = adapter
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, in)
    dropout = a.lora_dropout
    x_d = x2 if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x2)
    bias = base.bias.to(dtype) if base.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = _DoraLinear.apply(x2, x_d, base.weight.to(dtype), bias, a.lora_A.to(dtype), a.lora_B.to(dtype),
                              a.lora_magnitude_vector, norm, a.scaling)
    return y.view(*shape[:-1], y.shape[-1])


def fused_forward(layer: LoraLayer, adapter: Adapter, x: torch.Tensor, dtype: torch.dtype):
    """`dora_linear` for a single DoRA adapter on an `nn.Linear` whose weight is frozen (the
    caller checked the rest); None where the reference `forward` must run instead."""
    base = layer.base_layer
    if base.weight.requires_grad:  # a training base weight: autograd on the reference path
        return None
    return dora_linear(x, base, adapter, weight_norm(layer, adapter), dtype)


# --------------------------------------------------------------------------- merging

def _unmerged_base(layer: LoraLayer) -> torch.Tensor:
    """The base weight in fp32 with every merged adapter taken out (the W that forward sees).

    The merged adapters are unmerged, the weight copied, and merged again; nested merges inside
    that replay reuse the copy (``layer.held_unmerged_weight`` meanwhile) instead of unmerging
    once more."""
    weight = layer.base_layer.weight
    if not layer.merged_adapters:
        return weight.detach().float()
    if layer.held_unmerged_weight is not None:
        return layer.held_unmerged_weight
    previous = list(layer.merged_adapters)
    layer.unmerge()
    base = weight.detach().float().clone()
    layer.held_unmerged_weight = base
    try:
        layer.merge(previous)
    finally:
        layer.held_unmerged_weight = None
    return base


def _factor_in_weight_layout(layer: LoraLayer, factor: torch.Tensor) -> torch.Tensor:
    """(out,) -> a shape that scales the rows of W (out, in) or the columns of W stored (in, out)."""
    return factor.view(1, -1) if getattr(layer, "fan_in_fan_out", False) else factor.view(-1, 1)


def merged_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """PEFT's DoRA merge, fp32, in the weight's layout: ``W' = (m / ||W0 + s B A||) * (W + s B A)``
    with W0 the unmerged base weight and W the current one (earlier merges included). The
    norm is kept on the adapter for `unmerged_weight`."""
    a = layer.adapters[name]
    delta = layer.delta_in_weight_layout(name)  # W's layout, fp32
    base = _unmerged_base(layer)
    dim = 0 if getattr(layer, "fan_in_fan_out", False) else 1
    with torch.no_grad():
        norm = torch.linalg.norm(base + delta, dim=dim)  # (out,)
        a.variant_cache["merged_norm"] = norm
        factor = _factor_in_weight_layout(layer, a.lora_magnitude_vector.detach().float() / norm)
        return factor * (layer.base_layer.weight.detach().float() + delta)


def unmerged_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """The inverse of `merged_weight`: ``W = W' / (m / ||W0 + s B A||) - s B A``, fp32."""
    a = layer.adapters[name]
    delta = layer.delta_in_weight_layout(name)
    with torch.no_grad():
        factor = _factor_in_weight_layout(layer, a.lora_magnitude_vector.detach().float() / a.variant_cache["merged_norm"])
        return layer.base_layer.weight.detach().float() / factor - delta


# --------------------------------------------------------------------------- registration

def _wanted(config: LoraConfig) -> bool:
    return config.use_dora is True


def row_scale(layer: LoraLayer, a: Adapter) -> torch.Tensor:
    """A mixed batch's per-output factor for a DoRA row: ``c = m / ||W + s B A||``, (out,)."""
    return a.lora_magnitude_vector.float() / weight_norm(layer, a)


DORA = register_variant(AdapterVariant(
    name=NAME, wanted=_wanted, check_targets=check_targets, attach=add_magnitude, forward=forward,
    fused_forward=fused_forward, merged_weight=merged_weight, unmerged_weight=unmerged_weight,
    row_scale=row_scale,
))
"""DoRA's entry in `lorakit.plugins`: inject asks ``wanted(config)`` (use_dora), checks the targets
and attaches the magnitude; the layer runs forward / fused_forward / merged_weight /
unmerged_weight (and a mixed batch its row_scale) for adapters whose ``variant`` is "dora"."""
