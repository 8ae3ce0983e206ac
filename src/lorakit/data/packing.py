"""Packing: a micro-batch's examples laid end to end in a few rows, attention kept inside each.

A padded batch of B examples is a (B, T) tensor, T the longest example; most of it is padding
when lengths vary. A packed batch puts the same examples into R <= B rows of length L with
first-fit decreasing, and restarts ``position_ids`` at 0 at each example. Given ``position_ids``
and no ``attention_mask`` (and no key/value cache, which `loss_sum` never builds), transformers'
masking (``find_packed_sequence_indices``) cuts the causal mask into one block per run of
consecutive positions, so a token attends only to the earlier tokens of its own example:

    row:           a0 a1 a2 b0 b1 <pad> <pad>
    position_ids:   0  1  2  0  1   0     1
    labels:        -100 a1 a2 -100 b1 -100 -100

With ``varlen=True`` (the trainer's choice when the model runs lorakit's attention) a micro-batch
is one row of all its examples and no padding at all, plus ``cu_seq_lens``, the example
boundaries: the projections, norms and MLPs run on the real tokens only, and the attention lays
the examples out in padded rows of its own, one per example (`lorakit.kernels.attention`).

The labels of every example's first token are IGNORE_INDEX, so no example is trained to predict
its first token from the one before it. The loss, and its gradients, are those of the padded
batch (tests/data/test_packing.py checks logits, loss and gradients on a tiny Llama).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.attention import ATTENTION
from ..models.family import in_llama_family, unwrap
from .collate import example_fields
from .encode import IGNORE_INDEX, Example

__all__ = ["PackingCollator", "real_token_count", "shared_prefix", "supports_packing", "supports_varlen"]

PACKING_ATTENTION = ("sdpa", "eager", ATTENTION)  # the implementations that build the mask from position_ids


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices whose lengths sum to at most ``capacity``: longest first, each into the
    first bin it fits (ties keep index order, so the result is deterministic)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > capacity:
            raise ConfigError(f"an example of {lengths[i]} tokens does not fit a row of {capacity}")
        target = next((b for b, free in enumerate(room) if lengths[i] <= free), None)
        if target is None:
            bins.append([])
            room.append(capacity)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= lengths[i]
    return bins


@dataclass(frozen=True)
class PackingCollator:
    """``collate_fn`` that packs a list of Examples into as few rows as it can.

    Each row holds at most ``max(pack_length, longest example)`` tokens; with ``pack_length=None``
    (the trainer's choice) no row is longer than the longest example, so packing never makes
    attention's S x S work larger than the padded batch's, and only removes padding. Returns LongTensors of
    shape (R, L), L the longest row (rounded up to ``pad_to_multiple_of`` when set):
    ``input_ids`` (pad_token_id on the tail padding), ``labels`` (IGNORE_INDEX on padding and on
    each example's first token), ``position_ids`` (0, 1, ... per example; the tail padding is a
    run of its own) and ``token_mask`` (1 on example tokens, 0 on padding; not a model input,
    see ``real_token_count``). There is no ``attention_mask``: with one, transformers would
    not build the per-example mask.
    """

    pad_token_id: int
    pack_length: int | None = None
    pad_to_multiple_of: int | None = None
    varlen: bool = False
    """All examples in one row of exactly their total length (no padding at all), in the given
    order, with ``cu_seq_lens`` (B+1,) = [0, l0, l0+l1, ..., T], the example boundaries that
    lorakit's attention takes to attend example by example (`varlen_layout`). Only for a
    model with that attention; any other would attend over the whole row (correct, through the
    mask transformers builds from position_ids, but T x T work)."""

    share_prefix: bool = False
    """With ``varlen``: the tokens every example of the batch starts with (a system prompt, an
    instruction), up to the first token any of them is trained to predict, are laid down once at
    the head of the row, and each example's own tokens follow with their positions continuing
    from there: ``cu_seq_lens`` = [0, P, P+s0, ...] and ``shared_prefix`` = P. lorakit's attention
    lets every example see the prefix as its own, so logits, loss and gradients are those of the
    examples one by one, with the prefix computed once instead of once per example. Only where
    nothing in the model is random per position (LoRA dropout 0): with dropout, the examples
    would share the prefix's dropout masks."""

    def __post_init__(self) -> None:
        if self.pack_length is None:
            return
        if isinstance(self.pack_length, bool) or not isinstance(self.pack_length, int) or self.pack_length < 1:
            raise ConfigError(f"pack_length={self.pack_length!r}: must be a positive integer, e.g. 512, or None")

    def __call__(self, batch: Sequence[Example | Mapping]) -> dict[str, torch.Tensor]:
        pairs = [example_fields(item) for item in batch]
        if self.varlen:
            return _stream(pairs, shared_prefix(pairs) if self.share_prefix else 0)
        lengths = [len(ids) for ids, _ in pairs]
        rows = first_fit_decreasing(lengths, max(self.pack_length or 0, *lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # (R, L)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (R, L)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
        token_mask = torch.zeros((len(rows), width), dtype=torch.long)  # (R, L)
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids, labs = pairs[i]
                end = start + len(ids)
                input_ids[r, start:end] = torch.as_tensor(ids, dtype=torch.long)
                labels[r, start + 1:end] = torch.as_tensor(labs[1:], dtype=torch.long)  # first token: IGNORE
                position_ids[r, start:end] = torch.arange(len(ids))
                token_mask[r, start:end] = 1
                start = end
            position_ids[r, start:] = torch.arange(width - start)  # the tail padding: a run of its own
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "token_mask": token_mask}


def shared_prefix(pairs: Sequence[tuple[list[int], list[int]]]) -> int:
    """The number of leading tokens that every (input_ids, labels) pair has in common and that no
    loss term needs (``labels[1..P]`` all IGNORE_INDEX: position P-1 predicts nothing); 0 for a
    single example."""
    if len(pairs) < 2:
        return 0
    first = pairs[0][0]
    common = min(len(ids) for ids, _ in pairs)
    for ids, _ in pairs[1:]:
        common = next((t for t in range(common) if ids[t] != first[t]), common)
    for ids, labels in pairs:
        trained = next((t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX), len(ids))
        common = min(common, trained - 1)
    return max(common, 0)


def _stream(pairs: Sequence[tuple[list[int], list[int]]], prefix: int) -> dict[str, torch.Tensor]:
    """One row (1, T): the shared prefix (if any), then each example's own tokens; see PackingCollator."""
    ids = list(pairs[0][0][:prefix])
    labels = [IGNORE_INDEX] * prefix
    positions = list(range(prefix))
    bounds = [0, prefix] if prefix else [0]
    for example_ids, example_labels in pairs:
        ids += example_ids[prefix:]
        labels += [IGNORE_INDEX] + list(example_labels[prefix + 1:])  # its first token follows another example
        positions += range(prefix, len(example_ids))
        bounds.append(len(ids))
    out = {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
           "position_ids": torch.tensor([positions], dtype=torch.long),
           "token_mask": torch.ones(1, len(ids), dtype=torch.long),
           "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32)}
    if prefix:
        out["shared_prefix"] = torch.tensor(prefix)
        out["example_tokens"] = torch.tensor(sum(len(example_ids) for example_ids, _ in pairs))
    return out


def real_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens of the examples in a batch, padding not counted: ``example_tokens`` of a stream
    with a shared prefix (the prefix counted once per example, as the examples hold it),
    ``attention_mask`` of a padded batch, ``token_mask`` of a packed one, else every position."""
    if "example_tokens" in batch:
        return int(batch["example_tokens"])
    for key in ("attention_mask", "token_mask"):
        if key in batch:
            return int(batch[key].sum())
    return batch["input_ids"].numel()


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether packed rows give ``model`` the same loss as padded ones: a Llama-family model (its
    attention takes transformers' packed-sequence mask, its rotary positions come from
    position_ids) with sdpa, eager or lorakit attention."""
    return (in_llama_family(model)
            and getattr(unwrap(model).config, "_attn_implementation", None) in PACKING_ATTENTION)


def supports_varlen(model: torch.nn.Module) -> bool:
    """Whether ``model`` takes one-row streams of examples (``PackingCollator(varlen=True)``) and
    attends example by example: packing support with lorakit's attention."""
    return supports_packing(model) and getattr(unwrap(model).config, "_attn_implementation", None) == ATTENTION
