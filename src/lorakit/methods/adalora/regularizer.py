"""AdaLoRA's orthogonal regulariser: keeps A's rows and B's columns near orthonormal.

    R(A, B) = (1 / n) * sum over the adapter's layers of  ||A A^T - I||_F + ||B^T B - I||_F

with n the number of matrices (two per layer). This is PEFT's form (`AdaLoraModel.forward`):
the Frobenius norm itself, averaged; the paper (Zhang et al. 2023, eq. 4) writes the squared
norm, summed. Training adds ``orth_reg_weight * R`` to the loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from lorakit.methods.adalora.layer import svd_adapters

__all__ = ["orthogonal_regularizer"]


def orthogonal_regularizer(model: nn.Module, adapter_name: str) -> torch.Tensor:
    """R(A, B) of adapter ``adapter_name`` over every `SVDLinear` layer of ``model`` (0 if none)."""
    total, count = None, 0
    for _, adapter in svd_adapters(model, adapter_name):
        for cov in (adapter.lora_A @ adapter.lora_A.T, adapter.lora_B.T @ adapter.lora_B):  # (r, r)
            eye = torch.eye(*cov.shape, dtype=cov.dtype, device=cov.device)
            term = torch.norm(cov - eye, p="fro")
            total = term if total is None else total + term
            count += 1
    if total is None:
        return torch.zeros(())
    return total / count
