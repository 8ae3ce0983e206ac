"""A run's held-out examples as chats: the prompt's turns, and the answer they should get.

The examples are the ones the run was evaluated on, read as records and never tokenized
(`lorakit.data.load.heldout_records`, with the run's config.yaml: its val_file, else its
val_fraction split, else the built-in data's fixed split); without a run, the built-in task-api
held-out set. Each becomes the turns before its first assistant answer and that answer (what
`lorakit.evaluation.split_prompt` makes of the tokenized example); a prompt/completion record is
one user turn. Records without an answer to score (plain text) are left out.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import asdict, dataclass

from lorakit.data.load import heldout_records
from lorakit.data.preference import PreferenceRecord
from lorakit.data.records import RecordError, data_field_map, parse_record
from lorakit.errors import LorakitError
from lorakit.evaluation import scorer_for
from lorakit.infer.openai_api import RequestError
from lorakit.train.methods import TRAIN_METHODS
from lorakit.train.runs import run_config

__all__ = ["ChatExample", "HeldOut", "heldout_examples", "chat_example", "DEFAULT_DATA", "MAX_EXAMPLES"]

DEFAULT_DATA = "task-api"
"""The built-in data whose held-out set the playground shows without a run."""
MAX_EXAMPLES = 200
"""The most examples one request reads or scores."""


@dataclass(frozen=True)
class ChatExample:
    index: int
    """Its position in the held-out set."""
    messages: list[dict[str, str]]
    """The turns before the answer (system, user, ...)."""
    reference: str
    """The answer, stripped (what the scorer compares with)."""

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def prompt(self) -> str:
        """The last user turn's text."""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


@dataclass(frozen=True)
class HeldOut:
    data: str
    """The run's data as its config names it (or `DEFAULT_DATA`)."""
    scorer: str
    """`lorakit.evaluation.SCORERS`' name for it: how `lorakit eval` scores this data."""
    examples: list[ChatExample]


def chat_example(index: int, record) -> ChatExample | None:
    """A record (`records.Record`, or a preference pair: its prompt and chosen answer) as a
    `ChatExample`; None when it has no answer (a plain text record)."""
    if isinstance(record, PreferenceRecord):
        record = parse_record(record.chosen_record(), record.source)
    if record.messages is not None:
        turns = list(record.messages)
        first = next((i for i, m in enumerate(turns) if m["role"] == "assistant"), None)
        if first is None:
            return None
        return ChatExample(index, [dict(m) for m in turns[:first]], turns[first]["content"].strip())
    if record.completion is not None:
        return ChatExample(index, [{"role": "user", "content": record.prompt}], record.completion.strip())
    return None


def heldout_examples(run_dir: str | os.PathLike | None, limit: int) -> HeldOut:
    """The first ``limit`` held-out examples of the run in ``run_dir`` (None: the built-in
    task-api held-out set), with the run's data name and scorer."""
    if run_dir is None:
        data, records = DEFAULT_DATA, heldout_records(DEFAULT_DATA)
    else:
        config, raw, problem = run_config(run_dir)
        if config is None:
            raise RequestError(f"the run's {problem}; its held-out data cannot be found", status=409,
                               param="run", code="run_unreadable")
        data = config.data
        method = TRAIN_METHODS.get(config.method)
        preference = method is not None and method.preference
        try:
            records = heldout_records(
                config.data, val=config.val_file, val_fraction=config.val_fraction, seed=config.seed,
                skip_bad_records=config.skip_bad_records, preference=preference,
                record_format=None if preference else config.data_format,
                fields=None if preference else data_field_map(config.data_fields or []))
        except LorakitError as err:
            raise RequestError(f"the run's held-out data cannot be read: {err}", status=409, param="run",
                               code="data_unreadable") from None
        if records is None:
            raise RequestError(f"the run trained on {data} with no held-out data (no val_file, no val_fraction), "
                               "so there is nothing held out to try it on", status=409, param="run",
                               code="no_heldout_data")
    try:
        examples = [e for i, r in enumerate(itertools.islice(records, limit)) if (e := chat_example(i, r))]
    except (LorakitError, RecordError) as err:
        raise RequestError(f"the held-out data cannot be read: {err}", status=409, param="run",
                           code="data_unreadable") from None
    return HeldOut(str(data), scorer_for(str(data)), examples)
