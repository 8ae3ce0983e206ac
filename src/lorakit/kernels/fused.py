"""The fast LoRA linear forward and backward: one autograd node per adapted layer.

The reference forward (`LoraLinear.forward` with ``fused.disabled(model)``) reads as the paper writes
it: ``base(x) + scale * B(A(dropout(x)))``. Run by autograd, that is five nodes and several
full-size temporaries per layer: the low-rank output, its scaled copy, the sum, and under autocast
a cast of ``x`` up to the adapter's fp32 and back down again. This module computes the same thing
as one node:

    forward    h  = x_d A^T                      (N, r)      x_d = dropout(x), or x itself
               y  = x W^T + b;  y += s * h B^T   (N, out)    in place: no temporary of size N x out
    backward   gh = s * g B                      (N, r)
               dB = s * g^T h,  dA = gh^T x_d    (out, r), (r, in)
               dx = g W;  dx += gh A             (N, in)     in place, when x_d is x

It saves only what the gradients need (``x_d`` for dA, the small ``h`` for dB, and the frozen
``W``, which is not copied), computes no gradient for frozen weights, and runs every matrix
product in the compute dtype: the autocast dtype when autocast is on (bf16 on CPU and CUDA),
else the tensors' own dtype. Tests compare it with the reference forward on outputs and
gradients (tests/core/test_fused.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["FusedLayer", "disabled", "lora_linear", "compute_dtype"]


@runtime_checkable
class FusedLayer(Protocol):
    """A layer with a fused fast path that can be switched off (lorakit's LoRA layers declare it)."""

    use_fused: bool  # True (the default): take the fused path where it applies; False: the reference forward


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s LoRA layers on the plain reference forward inside this block (for checking and
    debugging); each layer's own switch is restored on the way out, so blocks nest."""
    layers = [m for m in model.modules() if isinstance(m, FusedLayer)]
    previous = [layer.use_fused for layer in layers]
    try:
        for layer in layers:
            layer.use_fused = False
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.use_fused = was


def compute_dtype(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor) -> torch.dtype | None:
    """The dtype the fused path multiplies in, or None when it should not run.

    Under autocast it is autocast's dtype (as for every other matmul of the model). Without
    autocast the fused path runs only when input, base weight and adapter share one dtype; mixed
    dtypes (a bf16 base with fp32 adapters outside autocast) keep the reference path's rule of
    computing the update in the adapter's dtype.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    if x.dtype == weight.dtype == lora_a.dtype:
        return x.dtype
    return None


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, bias, lora_a, lora_b, scaling):
        # x, x_d (N, in); weight (out, in); bias (out,) or None; lora_a (r, in); lora_b (out, r).
        # The adapter weights come in their own dtype (fp32 under bf16 autocast) and are cast here,
        # not by two more autograd nodes per layer; their gradients go back in that dtype.
        ctx.adapter_dtypes = lora_a.dtype, lora_b.dtype
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        h = x_d @ lora_a.t()  # (N, r)
        y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()  # (N, out)
        y.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.scaling = scaling
        ctx.same_input = x_d is x
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None,
                              x_d if ctx.needs_input_grad[4] else None, h, weight, lora_a, lora_b)
        return y

    @staticmethod
    def backward(ctx, g):
        x, x_d, h, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xd, need_w, need_b, need_a, need_lb, _ = ctx.needs_input_grad
        s = ctx.scaling
        grad_x = grad_xd = grad_w = grad_bias = grad_a = grad_lb = None
        gh = (g @ lora_b).mul_(s)  # (N, r)
        if need_lb:
            grad_lb = (g.t() @ h).mul_(s).to(ctx.adapter_dtypes[1])  # (out, r)
        if need_a:
            grad_a = (gh.t() @ x_d).to(ctx.adapter_dtypes[0])  # (r, in)
        if need_x:
            grad_x = g @ weight  # (N, in)
            if ctx.same_input:
                grad_x.addmm_(gh, lora_a)
        if need_xd and not ctx.same_input:
            grad_xd = gh @ lora_a  # (N, in)
        if need_w:
            grad_w = g.t() @ x  # (out, in): only when the base weight itself trains
        if need_b:
            grad_bias = g.sum(0)
        return grad_x, grad_xd, grad_w, grad_bias, grad_a, grad_lb, None


def lora_linear(x: torch.Tensor, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scaling: float, dropout: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """``base(x) + scaling * (dropout(x) @ A^T) @ B^T`` in ``dtype``, as one autograd node."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(dtype)  # (N, in)
    x_d = x2 if isinstance(dropout, nn.Identity) or not dropout.training else dropout(x2)
    bias = base.bias.to(dtype) if base.bias is not None else None
    with torch.autocast(x.device.type, enabled=False):
        y = _LoraLinear.apply(x2, x_d, base.weight.to(dtype), bias, lora_a, lora_b, scaling)
    return y.view(*shape[:-1], y.shape[-1])
