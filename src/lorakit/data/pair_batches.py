"""Batches of preference pairs: the 2N sequences padded, or one row with each prompt once.

`PairCollator` pads the 2N sequences (prompt + chosen for each pair, then prompt + rejected), as
TRL's DPO collator does; `PairStreamCollator` lays them end to end in one row with each prompt
once, for lorakit's attention, which lets both answers of a pair see their prompt as their own
(`lorakit.kernels.attention.varlen_layout` with segment parents). Both give ``labels`` (the
answer tokens), ``sequence`` (which answer each position belongs to: 2i for pair i's chosen, 2i+1
for its rejected) and ``nll_labels`` (prompt and chosen answer: ORPO's NLL term, as TRL computes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from .encode import IGNORE_INDEX
from .preference import PreferenceExample

__all__ = ["PairCollator", "PairStreamCollator"]


def _sequences(pairs: Sequence[PreferenceExample]) -> list[tuple[list[int], list[int], list[int], int]]:
    """(input_ids, labels, nll_labels, sequence id) of the 2N sequences: the chosen ones, then the rejected ones."""
    out = []
    for side, key in ((0, "chosen_ids"), (1, "rejected_ids")):
        for i, pair in enumerate(pairs):
            answer = getattr(pair, key)
            ids = pair.prompt_ids + answer
            labels = [IGNORE_INDEX] * len(pair.prompt_ids) + answer
            nll = list(ids) if side == 0 else [IGNORE_INDEX] * len(ids)
            out.append((ids, labels, nll, 2 * i + side))
    return out


@dataclass(frozen=True)
class PairCollator:
    """A padded batch of 2N rows (prompt + chosen for each pair, then prompt + rejected), as TRL's
    DPO collator lays it out: ``input_ids``, ``attention_mask``, ``labels`` (the answers),
    ``nll_labels`` (every token of the chosen rows), ``sequence`` (2N, T): 2i / 2i+1, and ``pairs``."""

    pad_token_id: int

    def __call__(self, pairs: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        rows = _sequences(pairs)
        width = max(len(ids) for ids, *_ in rows)
        shape = (len(rows), width)
        out = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros(shape, dtype=torch.long),
               "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
               "nll_labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
               "sequence": torch.full(shape, -1, dtype=torch.long)}
        for r, (ids, labels, nll, seq) in enumerate(rows):
            n = len(ids)
            out["input_ids"][r, :n] = torch.as_tensor(ids)
            out["attention_mask"][r, :n] = 1
            out["labels"][r, :n] = torch.as_tensor(labels)
            out["nll_labels"][r, :n] = torch.as_tensor(nll)
            out["sequence"][r, :n] = seq
        out["pairs"] = torch.tensor(len(pairs))
        return out


@dataclass(frozen=True)
class PairStreamCollator:
    """One row (1, T): for each pair its prompt but the last token (a segment of its own), then
    that token and the chosen answer, then that token and the rejected answer; each answer segment
    continues its prompt segment (``segment_parents``), so lorakit's attention gives it the prompt
    as its own while the prompt is computed once. Same ``labels``, ``nll_labels``, ``sequence`` and
    per-answer log-probabilities as `PairCollator`'s batch; ``example_tokens`` counts the tokens of
    the 2N sequences (each prompt twice), as the padded batch holds them."""

    varlen: ClassVar[bool] = True  # one row, no padding (as PackingCollator(varlen=True))
    share_prefix: ClassVar[bool] = True  # each prompt computed once for its two answers

    def __call__(self, pairs: Sequence[PreferenceExample]) -> dict[str, torch.Tensor]:
        ids: list[int] = []
        labels: list[int] = []
        nll: list[int] = []
        sequence: list[int] = []
        positions: list[int] = []
        bounds, parents = [0], []
        for i, pair in enumerate(pairs):
            head, last = pair.prompt_ids[:-1], pair.prompt_ids[-1]
            parent = -1
            if head:  # the prompt's tokens up to the last: the first, never predicted; the rest as NLL labels
                parent = len(parents)
                ids += head
                labels += [IGNORE_INDEX] * len(head)
                nll += [IGNORE_INDEX] + head[1:]
                sequence += [-1] * len(head)
                positions += range(len(head))
                bounds.append(len(ids))
                parents.append(-1)
            for side, answer in ((0, pair.chosen_ids), (1, pair.rejected_ids)):
                ids += [last] + answer
                labels += [IGNORE_INDEX] + answer  # the last prompt token follows another segment in the row
                # ORPO's NLL: the last prompt token is predicted by its prompt's end only in the chosen segment,
                # which directly follows the prompt (and only when there is a prompt segment before it)
                nll += ([last if head else IGNORE_INDEX] + answer) if side == 0 else [IGNORE_INDEX] * (1 + len(answer))
                sequence += [2 * i + side] * (1 + len(answer))
                positions += range(len(head), len(head) + 1 + len(answer))
                bounds.append(len(ids))
                parents.append(parent)
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "nll_labels": torch.tensor([nll]),
                "sequence": torch.tensor([sequence]), "position_ids": torch.tensor([positions]),
                "token_mask": torch.ones(1, len(ids), dtype=torch.long),
                "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32), "segment_parents": torch.tensor(parents),
                "example_tokens": torch.tensor(sum(p.tokens for p in pairs)), "pairs": torch.tensor(len(pairs))}
