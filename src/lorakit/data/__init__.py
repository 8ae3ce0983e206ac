"""Training data: JSONL records, chat rendering with assistant-only labels, batches, built-ins.

Typical use::

    from lorakit.data import load_data, Collator
    splits = load_data("task-api", tokenizer=tokenizer, max_length=512)
    print(splits.train.summary())
    loader = DataLoader(splits.train, batch_size=8, collate_fn=Collator(tokenizer.pad_token_id))
    # a Llama-family model (supports_packing) can take the same examples packed into rows,
    # attention kept inside each example (forward passes without a key/value cache, as loss_sum)
    packed = PackingCollator(tokenizer.pad_token_id)  # rows no longer than the longest example
"""

from . import task_api
from .chat import ChatTemplateError, chat_ids, chat_prompt_ids, render_chat
from .collate import Collator, length_grouped_batches
from .dataset import OVERLONG_POLICIES, TokenizedDataset, tokenize_records
from .encode import IGNORE_INDEX, Example, assistant_spans, encode_record
from .load import BUILTIN_DATASETS, BUILTIN_PREFERENCES, DataSplits, PreferenceSplits, load_data, load_preferences, split_records
from .pair_batches import PairCollator, PairStreamCollator
from .preference import PreferenceDataset, PreferenceExample, PreferenceRecord, read_preferences, tokenize_preferences
from .packing import PackingCollator, real_token_count, supports_packing, supports_varlen
from .records import REASONS, ROLES, Record, parse_record, read_jsonl, records_from_dicts
from .sources import read_rows, rows
from .store import ExampleStore, ExampleView, lengths_of, subset

__all__ = [
    "BUILTIN_DATASETS",
    "BUILTIN_PREFERENCES",
    "ExampleStore",
    "ExampleView",
    "lengths_of",
    "subset",
    "read_rows",
    "rows",
    "PairCollator",
    "PairStreamCollator",
    "PreferenceDataset",
    "PreferenceExample",
    "PreferenceRecord",
    "PreferenceSplits",
    "load_preferences",
    "read_preferences",
    "tokenize_preferences",
    "IGNORE_INDEX",
    "OVERLONG_POLICIES",
    "REASONS",
    "ROLES",
    "ChatTemplateError",
    "Collator",
    "DataSplits",
    "Example",
    "PackingCollator",
    "Record",
    "TokenizedDataset",
    "assistant_spans",
    "chat_ids",
    "chat_prompt_ids",
    "encode_record",
    "length_grouped_batches",
    "load_data",
    "parse_record",
    "read_jsonl",
    "real_token_count",
    "records_from_dicts",
    "render_chat",
    "split_records",
    "supports_packing",
    "supports_varlen",
    "task_api",
    "tokenize_records",
]
