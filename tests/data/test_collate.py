"""Padding batches and grouping by length (no tokenizer needed)."""

import torch

from lorakit.data import IGNORE_INDEX, Collator, Example, length_grouped_batches


def test_collate_pads_right_with_masked_labels():
    batch = [Example([5, 6, 7], [IGNORE_INDEX, 6, 7], "a:1"), {"input_ids": [8], "labels": [8]}]
    out = Collator(pad_token_id=0)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert all(t.dtype == torch.long for t in out.values())


def test_collate_pads_to_a_multiple():
    out = Collator(pad_token_id=2, pad_to_multiple_of=8)([Example([1, 2, 3], [1, 2, 3], "a:1")])
    assert out["input_ids"].shape == (1, 8) and out["attention_mask"].sum() == 3


def test_length_grouped_batches_cover_each_index_once_and_are_deterministic():
    lengths = [(i * 37) % 101 for i in range(250)]
    batches = length_grouped_batches(lengths, 8, seed=1, group=4)
    assert sorted(i for b in batches for i in b) == list(range(250))
    assert batches == length_grouped_batches(lengths, 8, seed=1, group=4)
    assert batches != length_grouped_batches(lengths, 8, seed=2, group=4)
    for batch in batches:  # sorted within each batch, longest first
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
