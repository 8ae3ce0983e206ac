"""The fused RMSNorm (`lorakit.kernels.norms`) swapped into a transformers model's Llama-style norms.

`use_fused_norms(model)` gives every Llama-style RMSNorm module of a model the one-node forward:
its class becomes a subclass of its own class and of `FusedRMSNorm` (so isinstance, state_dict,
deepcopy and repr are unchanged). A trainable weight, or one in another dtype than the input,
keeps transformers' own forward. Tests compare with transformers' forward on outputs and
gradients (tests/models/test_norms.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.kernels.norms import rms_norm

__all__ = ["FusedRMSNorm", "use_fused_norms"]


class FusedRMSNorm(nn.Module):
    """The fused forward, mixed into a model's own RMSNorm class (`use_fused_norms`) ahead of it."""

    weight: torch.Tensor
    variance_epsilon: float

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.weight.requires_grad or self.weight.dtype != hidden_states.dtype:
            return super().forward(hidden_states)  # the model's own RMSNorm
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _fused_class(cls: type) -> type:
    """The subclass of ``cls`` (a model's own RMSNorm class) and `FusedRMSNorm`: made once, then
    found among ``cls``'s subclasses, so that every norm of a class shares one class."""
    for sub in cls.__subclasses__():
        if issubclass(sub, FusedRMSNorm):
            return sub
    return type(cls.__name__, (FusedRMSNorm, cls), {"__module__": cls.__module__})


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
            if not isinstance(module, FusedRMSNorm):
                module.__class__ = _fused_class(type(module))
            count += 1
    return count
