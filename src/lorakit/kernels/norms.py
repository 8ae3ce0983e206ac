"""RMSNorm as one autograd node.

transformers' ``LlamaRMSNorm`` is written as eight tensor operations (cast up, square, mean, add,
rsqrt, multiply, cast down, multiply by the weight); autograd saves and walks each of them, about
twenty full passes over the activations per norm in a training step, and a Llama has two norms
per layer. `rms_norm` computes the same function in fp32 with the fewest passes:

    forward    r = 1 / sqrt(mean(x^2) + eps)          y = round(x r) * w
    backward   xh = x r,  gw = g * w                  dx = r (gw - xh mean(gw xh))

saving only x (the layer's input, already kept) and r (one number per token). The weight is
frozen in LoRA training and gets no gradient here. Swapping it into a transformers model is
`lorakit.models.norms`' job; tests compare with transformers' forward on outputs and gradients
(tests/models/test_norms.py).
"""

from __future__ import annotations

import torch

__all__ = ["RMSNorm", "rms_norm"]


class RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32, copy=True)  # a copy even for fp32 input: it is scaled in place below
        n = x.shape[-1]
        rstd = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square_().div_(n).add_(eps).rsqrt_()  # (..., 1)
        y = xf.mul_(rstd).to(x.dtype).mul_(weight)  # rounded to x's dtype before the weight, as transformers
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        xhat = x.to(torch.float32, copy=True).mul_(rstd)
        gw = grad.to(torch.float32, copy=True).mul_(weight)
        dot = torch.linalg.vecdot(gw, xhat, dim=-1).unsqueeze(-1).div_(-x.shape[-1])  # -mean(gw xh)
        return xhat.mul_(dot).add_(gw).mul_(rstd).to(x.dtype), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``round(x / sqrt(mean(x^2) + eps)) * weight`` over the last axis, as one node; ``weight``
    (in x's dtype) gets no gradient."""
    return RMSNorm.apply(x, weight, eps)
