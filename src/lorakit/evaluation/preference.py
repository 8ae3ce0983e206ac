"""Log-probabilities of whole answers: what DPO and ORPO compare, for a batch of preference pairs.

    logp(answer) = sum over the answer's label tokens t of  log softmax(logits_{t-1})[y_t]

for each answer of a `PairCollator` or `PairStreamCollator` batch (the ``sequence`` key says
which answer a label belongs to: 2i for pair i's chosen, 2i+1 for its rejected). For the
Llama family with a plain output head the head runs on the label positions only
(`lorakit.kernels.loss.head_log_probs`, chunked, no (T, V) logits); any other model takes the
log-softmax of its full logits. ``nll``: also ORPO's NLL term, the summed cross-entropy over
``nll_labels`` (prompt and chosen answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.data.encode import IGNORE_INDEX
from lorakit.evaluation.loss import HEAD_ON_LABELS_ONLY, model_inputs
from lorakit.kernels.loss import head_log_probs
from lorakit.models.family import unwrap
from lorakit.models.heads import plain_head

__all__ = ["AnswerLogProbs", "answer_log_probs"]


@dataclass
class AnswerLogProbs:
    """Per answer: ``logps`` (2N,) summed log-probabilities, ``tokens`` (2N,) label tokens, in
    the order chosen 0, rejected 0, chosen 1, ...; ``nll`` the summed NLL over ``nll_labels`` and
    ``nll_tokens`` their count (when asked for)."""

    logps: torch.Tensor
    tokens: torch.Tensor
    nll: torch.Tensor | None = None
    nll_tokens: int = 0

    @property
    def chosen(self) -> torch.Tensor:
        return self.logps[0::2]

    @property
    def rejected(self) -> torch.Tensor:
        return self.logps[1::2]


def _token_log_probs(model, batch: dict[str, torch.Tensor], labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """For each (B, T) label tensor, the log-probabilities of its label tokens (fp32, in the
    order of ``labels[:, 1:][mask]``), from one forward of ``model``."""
    lm = unwrap(model)
    masks = [lab[:, 1:] != IGNORE_INDEX for lab in labels]
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in HEAD_ON_LABELS_ONLY and plain_head(lm):
        hidden = lm.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, H)
        head = lm.get_output_embeddings()
        return [head_log_probs(hidden[m], head, lab[:, 1:][m])["log_probs"] for lab, m in zip(labels, masks)]
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1].float()  # (B, T-1, V)
    out = []
    for lab, m in zip(labels, masks):
        picked = logits[m]  # (n, V)
        out.append(picked.log_softmax(-1).gather(1, lab[:, 1:][m][:, None]).squeeze(1))
    return out


def answer_log_probs(model, batch: dict[str, torch.Tensor], *, nll: bool = False) -> AnswerLogProbs:
    """The summed log-probability of every answer in ``batch`` under ``model`` as it is set up
    (its active adapter, or none inside ``disable_adapter()``); gradients flow unless called
    under ``torch.no_grad()``."""
    pairs = int(batch["pairs"])
    labels = [batch["labels"]] + ([batch["nll_labels"]] if nll else [])
    per_token = _token_log_probs(model, batch, labels)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    sequence = batch["sequence"][:, 1:][mask]
    logps = per_token[0].new_zeros(2 * pairs).index_add(0, sequence, per_token[0])
    tokens = torch.bincount(sequence, minlength=2 * pairs)
    if not nll:
        return AnswerLogProbs(logps, tokens)
    return AnswerLogProbs(logps, tokens, nll=-per_token[1].sum(), nll_tokens=len(per_token[1]))

