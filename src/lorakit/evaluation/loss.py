"""The loss on label tokens (the training objective) and the held-out loss.

    loss_sum = sum over label positions t of  -log softmax(logits_t)[y_{t+1}]

where ``y`` are the labels (``IGNORE_INDEX`` marks the positions without a loss) shifted by one:
the token at t+1 is predicted at position t. The trainer divides the sum by the label tokens of
a whole step; `heldout_loss` by those of the held-out set (mean cross-entropy per answer token).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lorakit.data.collate import Collator
from lorakit.data.encode import IGNORE_INDEX, Example
from lorakit.models.attention import varlen_inputs
from lorakit.models.family import LLAMA_FAMILY, unwrap
from lorakit.models.heads import label_loss_sum, plain_head

__all__ = ["HEAD_ON_LABELS_ONLY", "MODEL_INPUTS", "model_inputs", "loss_sum", "heldout_loss"]

# Architectures whose logits are lm_head(final hidden state): for these the output head runs on
# the label positions only (prompt and padding tokens never reach the vocabulary), unless the
# config scales or softcaps the logits (granite's logits_scaling): `plain_head` says.
HEAD_ON_LABELS_ONLY = LLAMA_FAMILY


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch the model takes: a padded batch has ``attention_mask``; a packed one has
    ``position_ids`` that restart at each example (and no mask), which keeps attention inside it
    as long as the forward builds no key/value cache (``use_cache=False``, as `loss_sum` passes)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "cu_seq_lens" in batch:  # one row of examples end to end (PackingCollator(varlen=True)), laid out once
        # lorakit's attention: every example continues the row's first P tokens (the shared prefix)
        inputs |= varlen_inputs(batch["cu_seq_lens"], int(batch.get("shared_prefix", 0)), batch.get("segment_parents"))
    return inputs


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over label tokens, number of label tokens).

    Summing (not averaging) lets gradient accumulation divide by the tokens of the whole step.
    """
    lm = unwrap(model)
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = labels != IGNORE_INDEX  # (B, T-1)
    count = int(mask.sum())
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in HEAD_ON_LABELS_ONLY and plain_head(lm):
        hidden = lm.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state  # (B, T, H)
        return label_loss_sum(lm, hidden, batch["labels"])[0], count  # the head on label positions only
    logits = model(**model_inputs(batch), use_cache=False).logits
    logits = logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits[mask], labels[mask], reduction="sum"), count


@torch.no_grad()
def heldout_loss(model, examples: Sequence[Example], collate: Collator, batch_size: int,
                 autocast: Callable) -> float:
    """Mean cross-entropy per label token over ``examples``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        with autocast():
            loss, count = loss_sum(model, batch)
        total += float(loss)
        tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def _device(model) -> torch.device:
    return next(model.parameters()).device
