"""RMSNorm as one autograd node, for the Llama family's norms.

transformers' ``LlamaRMSNorm`` is written as eight tensor operations (cast up, square, mean, add,
rsqrt, multiply, cast down, multiply by the weight); autograd saves and walks each of them, about
twenty full passes over the activations per norm in a training step, and a Llama has two norms
per layer. `RMSNorm` computes the same function in fp32 with the fewest passes:

    forward    r = 1 / sqrt(mean(x^2) + eps)          y = round(x r) * w
    backward   xh = x r,  gw = g * w                  dx = r (gw - xh mean(gw xh))

saving only x (the layer's input, already kept) and r (one number per token). The norm's weight
is frozen in LoRA training and gets no gradient here; a trainable weight keeps transformers' own
forward. `use_fused_norms(model)` switches a model's RMSNorm modules over; tests compare with
transformers' forward on outputs and gradients (tests/models/test_norms.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["RMSNorm", "use_fused_norms"]


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


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    if self.weight.requires_grad or self.weight.dtype != hidden_states.dtype:
        return super(type(self), self).forward(hidden_states)  # the model's own RMSNorm
    return RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


_FUSED_CLASSES: dict[type, type] = {}


def _fused_class(cls: type) -> type:
    """A subclass of the model's own RMSNorm class whose forward is the fused one (so isinstance,
    state_dict, deepcopy and repr are unchanged)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(cls.__name__, (cls,), {"forward": _fused_forward, "__module__": cls.__module__,
                                                          "_lorakit_fused": True})
    return _FUSED_CLASSES[cls]


def _is_llama_rmsnorm(module: nn.Module) -> bool:
    name = type(module).__name__
    return (name.endswith("RMSNorm") and not name.startswith("Gemma")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and isinstance(getattr(module, "variance_epsilon", None), float))


def use_fused_norms(model: nn.Module) -> int:
    """Give every Llama-style RMSNorm in ``model`` the fused forward; returns how many."""
    count = 0
    for module in model.modules():
        if _is_llama_rmsnorm(module):
            if not getattr(type(module), "_lorakit_fused", False):
                module.__class__ = _fused_class(type(module))
            count += 1
    return count
