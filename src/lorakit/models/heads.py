"""The loss heads `speedup` puts on a causal LM: the output head on the label positions only.

- `label_loss_sum`: the next-token cross-entropy summed over the label positions, from the final
  hidden states, without the (B, T, V) logits (`lorakit.kernels.loss`); the trainer's loss and the
  loss of a model trained elsewhere (`mean_label_loss`, transformers' ``ForCausalLMLoss`` contract);
- `plain_head`: whether a model's logits are exactly ``lm_head(hidden)``, so that the above holds;
- `fused_head`: TRL's fused LM head (``model(..., fused_lm_head=True)``) served the same way.

TRL's SFTTrainer installs its fused LM head (``add_fused_lm_head``) around the model's forward and
calls ``model(..., fused_lm_head=True)``. speedup applied (again) after that sits around TRL's
forward and serves the call from the label positions only (`fused_head`), with TRL's
``FusedCausalLMOutput``, wherever its head computes what TRL's would (`trl_fused_head`); tests
compare the outputs and adapter gradients with TRL's own head, padded and packed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from lorakit.kernels.loss import STATS, head_cross_entropy, head_log_probs

__all__ = ["IGNORE_INDEX", "label_loss_sum", "mean_label_loss", "plain_head", "FusedLMHeadOutput",
           "trl_fused_head", "fused_head"]

IGNORE_INDEX = -100  # the label transformers' ForCausalLMLoss (and PyTorch's cross-entropy) skips


def label_loss_sum(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, *,
                   shifted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropies over the label positions, their (B, T-1) mask) from the
    final hidden states ``hidden`` (B, T, H) of the causal LM ``lm`` (logits = ``lm_head(hidden)``).

    ``labels`` (B, T) are shifted as transformers' ForCausalLMLoss shifts them: the token at t+1 is
    predicted at position t, the last position predicts nothing; ``shifted``: they already are
    (transformers' ``shift_labels``), one per position. Positions labelled ``IGNORE_INDEX`` never
    reach the output head."""
    if not shifted:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    labels = labels.to(hidden.device)
    mask = labels != IGNORE_INDEX
    return head_cross_entropy(hidden[mask], lm.get_output_embeddings(), labels[mask]), mask


def plain_head(lm: nn.Module) -> bool:
    """Whether the logits are exactly ``lm_head(hidden)`` and the loss transformers' causal-LM loss
    (no logit scaling or softcapping, no loss function of the user's own)."""
    config = lm.config
    if getattr(config, "logits_scaling", None) not in (None, 1, 1.0) or \
            getattr(config, "final_logit_softcapping", None):
        return False
    if "_loss_function" in vars(lm) or getattr(lm, "loss_type", None) not in (None, "ForCausalLM"):
        return False
    return hasattr(lm, "get_decoder") and hasattr(lm, "get_output_embeddings")


@torch.compiler.disable
def mean_label_loss(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, shift_labels, num_items_in_batch) -> torch.Tensor:
    total, mask = label_loss_sum(lm, hidden, labels if shift_labels is None else shift_labels,
                                 shifted=shift_labels is not None)
    if num_items_in_batch is None:
        return total / mask.sum()  # transformers' mean over the label tokens (NaN when there are none, as there)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """The fields of TRL's ``FusedCausalLMOutput`` (`fused_head` returns TRL's own class when its
    module is loaded): per-token fields are zero where the label is ignored, None when not asked for."""

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    log_sum_sq_probs: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    label_mask: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def trl_fused_head(lm: nn.Module, wrapped: Callable | None) -> dict | None:
    """What TRL's ``add_fused_lm_head`` was given (temperature, outputs, cast_lm_head_to_fp32 and
    its output class) when ``wrapped`` is the forward it installed on ``lm``, and speedup's head
    computes what it would: logits exactly ``lm_head(hidden)`` (no scale, no softcapping) and no
    MoE load-balancing loss. None otherwise: the call then goes to TRL's own head."""
    func = getattr(wrapped, "__func__", None)
    code = getattr(func, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or getattr(wrapped, "__self__", None) is not lm:
        return None
    try:
        cells = {name: cell.cell_contents for name, cell in zip(code.co_freevars, func.__closure__ or ())}
    except ValueError:  # an empty cell: not the function this reads
        return None
    if not {"temperature", "outputs", "cast_lm_head_to_fp32", "logit_scale", "final_logit_softcapping"} <= cells.keys():
        return None
    temperature, outputs = cells["temperature"], tuple(cells["outputs"])
    if cells["logit_scale"] != 1.0 or cells["final_logit_softcapping"] is not None:
        return None
    if not isinstance(temperature, (int, float)) or not temperature > 0 or set(outputs) - {"log_probs", *STATS}:
        return None
    if getattr(lm.config.get_text_config(), "output_router_logits", False):  # TRL adds the MoE loss
        return None
    return {"temperature": float(temperature), "outputs": outputs, "fp32": bool(cells["cast_lm_head_to_fp32"]),
            "output_class": func.__globals__.get("FusedCausalLMOutput", FusedLMHeadOutput)}


@torch.compiler.disable
def fused_head(lm: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, shift_labels, num_items_in_batch,
                trl: dict):
    """TRL's fused LM head output (``FusedCausalLMOutput``) from the label positions only."""
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = lm.get_output_embeddings()
    hidden, labels = hidden.to(head.weight.device), labels.to(head.weight.device)
    mask = labels != IGNORE_INDEX
    picked = hidden[mask]
    with torch.autocast(hidden.device.type, enabled=False) if trl["fp32"] else contextlib.nullcontext():
        stats = head_log_probs(picked.float() if trl["fp32"] else picked, head, labels[mask],
                               temperature=trl["temperature"],
                               stats=tuple(s for s in trl["outputs"] if s != "log_probs"))
    # masked_scatter keeps the output connected to the model when no label counts (a differentiable zero, as TRL's)
    per_token = {name: (stats[name].new_zeros(mask.shape).masked_scatter(mask, stats[name])
                        if name == "log_probs" or name in trl["outputs"] else None)
                 for name in ("log_probs", *STATS)}
    count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if torch.is_tensor(count):
        count = count.to(per_token["log_probs"].device)
    loss = -per_token["log_probs"].sum() / count
    return trl["output_class"](loss=loss, label_mask=mask, aux_loss=None, **per_token)
