"""Preference data for DPO and ORPO: a prompt, the answer to prefer and the answer to avoid.

Three record shapes, one JSON object per line (other keys, such as ``"id"``, are ignored)::

    {"prompt": "...", "chosen": "...", "rejected": "..."}               plain text; EOS ends each answer
    {"messages": [{"role": "system", ...}, {"role": "user", ...}],      a chat prompt; each answer is one
     "chosen": "...", "rejected": "..."}                                 assistant turn (a string, a message
    {"prompt": [messages], "chosen": [{"role": "assistant", ...}],       or a list of one message), ended by
     "rejected": [{"role": "assistant", ...}]}                           the template's end-of-turn token

Each line is read with the same checks as supervised records (`records`): bytes split on ``\\n``,
UTF-8 per line, depth and size limits, duplicate keys, lone surrogates; a bad record raises
``DataError("file:line: reason; fix")``, or is skipped and counted with ``skip_bad_records``.
A pair whose two answers are the same text teaches nothing and is a bad record.

A tokenized pair (`PreferenceExample`) keeps the prompt's tokens and each answer's tokens apart;
`lorakit.data.pair_batches` turns a list of them into a batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from .chat import ChatTemplateError, render_chat
from .dataset import TokenizedDataset, check_length_policy, length_profile
from .encode import Example, encode_record
from .records import REASONS, RecordError, _json_type, _string, messages_of, parse_record, read_jsonl, reject

__all__ = ["PREFERENCE_REASONS", "PreferenceRecord", "PreferenceExample", "PreferenceDataset", "parse_preference",
           "read_preferences", "tokenize_preferences", "preference_records_from_dicts"]

PREFERENCE_REASONS: dict[str, str] = REASONS | {
    "missing_field": 'a preference record needs "chosen" and "rejected" answers and a "prompt" (text, or a list of '
    'messages) or "messages" (the chat before the answers)',
    "wrong_type": "prompt, chosen and rejected must be strings (or, in a chat record, messages: chosen and rejected "
    "one assistant message each)",
    "empty_text": "prompt, chosen and rejected must not be empty",
    "same_answers": "chosen and rejected are the same text, so the pair prefers nothing; fix or remove it",
    "no_loss_tokens": "the prompt fills max_length, leaving no answer tokens; raise max_length or shorten it",
}

@dataclass(frozen=True)
class PreferenceRecord:
    """One pair as read: a text ``prompt`` or chat ``messages`` (exactly one), and the two answers."""

    source: str
    chosen: str
    rejected: str
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    @property
    def kind(self) -> str:
        return "chat" if self.messages is not None else "text"

    def chosen_record(self) -> dict:
        """The pair's prompt and its chosen answer as a supervised record (scoring, SFT)."""
        if self.messages is not None:
            return {"messages": [*self.messages, {"role": "assistant", "content": self.chosen}]}
        return {"prompt": self.prompt, "completion": self.chosen}


def _answer(obj: Mapping, key: str, chat: bool) -> str:
    if key not in obj:
        raise RecordError("missing_field", f'missing field "{key}"')
    value = obj[key]
    if chat and isinstance(value, list):
        if len(value) != 1:
            raise RecordError("wrong_type", f'field "{key}" holds {len(value)} messages; give one assistant message')
        value = value[0]
    if chat and isinstance(value, dict):
        role = _string(value, "role", f" of {key}")
        if role != "assistant":
            raise RecordError("unknown_role", f'the "{key}" message has role {role!r}, not "assistant"')
        text = _string(value, "content", f" of {key}")
    else:
        text = _string(obj, key)
    if not text.strip():
        raise RecordError("empty_text", f'field "{key}" is empty')
    return text


def _prompt_messages(value: object, key: str) -> tuple[dict[str, str], ...]:
    out = messages_of(value, key)
    if out[-1]["role"] == "assistant":
        raise RecordError("wrong_type", f'the last message of "{key}" is an assistant turn; the prompt ends with the '
                                        "turn the answers reply to")
    return tuple(out)


def parse_preference(obj: object, source: str) -> PreferenceRecord:
    """Check one decoded JSON value and return it as a PreferenceRecord; RecordError if unusable."""
    if not isinstance(obj, dict):
        raise RecordError("wrong_type", f"the line is {_json_type(obj)}, not an object")
    if "messages" in obj or isinstance(obj.get("prompt"), list):
        key = "messages" if "messages" in obj else "prompt"
        if key == "messages" and "prompt" in obj:
            raise RecordError("wrong_type", 'give the chat before the answers as "messages" or as "prompt", not both')
        messages = _prompt_messages(obj[key], key)
        chosen, rejected = _answer(obj, "chosen", True), _answer(obj, "rejected", True)
        record = PreferenceRecord(source, chosen, rejected, messages=messages)
    elif "prompt" in obj:
        prompt = _string(obj, "prompt")
        if not prompt.strip():
            raise RecordError("empty_text", 'field "prompt" is empty')
        record = PreferenceRecord(source, _answer(obj, "chosen", False), _answer(obj, "rejected", False), prompt=prompt)
    else:
        keys = ", ".join(sorted(map(str, obj))) or "none"
        raise RecordError("missing_field", f'no "prompt" or "messages" field (keys: {keys})')
    if record.chosen == record.rejected:
        raise RecordError("same_answers", "chosen and rejected are the same text")
    return record


def read_preferences(path: str | Path, *, skip_bad_records: bool = False) -> tuple[list[PreferenceRecord], Counter]:
    """Read a JSONL file of preference pairs, and the counts of skipped records by reason."""
    return read_jsonl(path, skip_bad_records=skip_bad_records, parse=parse_preference, reasons=PREFERENCE_REASONS)


def preference_records_from_dicts(dicts: Sequence[object], name: str) -> list[PreferenceRecord]:
    """Records from in-memory objects (a built-in set); ``name`` labels them ``name:index``."""
    out = []
    for i, obj in enumerate(dicts, start=1):
        try:
            out.append(parse_preference(obj, f"{name}:{i}"))
        except RecordError as error:
            reject(error, f"{name}:{i}", None, PREFERENCE_REASONS)
    return out


@dataclass(frozen=True)
class PreferenceExample:
    """One tokenized pair: the prompt's tokens and each answer's (answers end with EOS or the
    template's end-of-turn token); ``scored``: the prompt and chosen answer as a supervised Example."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str
    scored: Example | None = None

    def __len__(self) -> int:
        """The tokens of the pair with its prompt once (what `PairStreamCollator` lays down)."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)

    @property
    def tokens(self) -> int:
        """The tokens of its two sequences, prompt + chosen and prompt + rejected."""
        return 2 * len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PreferenceDataset(TokenizedDataset):
    """Tokenized pairs and what was left out on the way, by reason, as `TokenizedDataset`; its
    ``num_tokens`` counts the tokens of both sequences of each pair (each prompt twice)."""

    examples: list[PreferenceExample]
    unit = "preference pairs"

    @property
    def num_tokens(self) -> int:
        return sum(e.tokens for e in self.examples)


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    try:
        return render_chat(tokenizer, messages, generation_prompt=generation_prompt)
    except ChatTemplateError as exc:
        raise RecordError("template_mismatch", str(exc)) from None


def _chat_answer_ids(tokenizer, messages, prompt_text: str, answer: str) -> list[int]:
    """The answer's turn as the template renders it after the prompt, through its end-of-turn
    token (trailing whitespace excluded, as in supervised chat labels)."""
    whole = _render(tokenizer, [*messages, {"role": "assistant", "content": answer}])
    if not whole.startswith(prompt_text):
        raise RecordError("template_mismatch", "the chat template renders the prompt differently before an answer")
    return tokenizer(whole[len(prompt_text):].rstrip(), add_special_tokens=False)["input_ids"]


def _encode(record: PreferenceRecord, tokenizer) -> PreferenceExample:
    scored = encode_record(parse_record(record.chosen_record(), record.source), tokenizer)
    if record.messages is not None:
        prompt_text = _render(tokenizer, record.messages, generation_prompt=True)
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        chosen = _chat_answer_ids(tokenizer, record.messages, prompt_text, record.chosen)
        rejected = _chat_answer_ids(tokenizer, record.messages, prompt_text, record.rejected)
    else:
        eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        prompt = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]  # BOS, if the model uses one
        chosen = tokenizer(record.chosen, add_special_tokens=False)["input_ids"] + eos
        rejected = tokenizer(record.rejected, add_special_tokens=False)["input_ids"] + eos
    return PreferenceExample(list(prompt), list(chosen), list(rejected), record.source, scored)


def tokenize_preferences(records: Sequence[PreferenceRecord], tokenizer, *, max_length: int | None = 1024,
                         overlong: str = "truncate", skip_bad_records: bool = False,
                         skipped: Counter | None = None, name: str = "") -> PreferenceDataset:
    """Tokenize pairs; a pair whose prompt + longer answer exceeds ``max_length`` tokens is
    truncated (each answer cut to fit after the prompt, as TRL keeps the start), dropped
    (``too_long``) or an error, per ``overlong``. A prompt that leaves no room for an answer
    token is always left out (``no_loss_tokens``)."""
    check_length_policy(max_length, overlong)
    # the reader may still be counting into ``skipped`` as records stream in: the same counter
    skipped = skipped if isinstance(skipped, Counter) else Counter(skipped or {})
    count_into = skipped if skip_bad_records else None
    examples, truncated, shapes, full_lengths = [], 0, Counter(), []
    for record in records:
        shapes[record.kind] += 1
        try:
            example = _encode(record, tokenizer)
        except RecordError as error:
            reject(error, record.source, count_into, PREFERENCE_REASONS)
            continue
        full_lengths.append(len(example))
        longest = len(example.prompt_ids) + max(len(example.chosen_ids), len(example.rejected_ids))
        if max_length is not None and longest > max_length:
            if overlong == "drop":
                skipped["too_long"] += 1
                continue
            if overlong == "error":
                detail = f"{longest} tokens (prompt and longer answer), more than max_length={max_length}"
                reject(RecordError("too_long", detail), record.source, count_into, PREFERENCE_REASONS)
                continue
            room = max_length - len(example.prompt_ids)
            if room < 1:
                skipped["no_loss_tokens"] += 1
                continue
            example = PreferenceExample(example.prompt_ids, example.chosen_ids[:room], example.rejected_ids[:room],
                                        example.source, example.scored)
            truncated += 1
        examples.append(example)
    if not examples:
        counts = ", ".join(f"{r} {n}" for r, n in sorted(skipped.items())) or "no records"
        raise DataError(f"{name or 'data'}: no usable preference pairs ({counts}); fix the records or the max_length")
    profile = {"shapes": dict(shapes), "lengths": length_profile(full_lengths), "max_length": max_length,
               "label_tokens": sum(len(e.chosen_ids) + len(e.rejected_ids) for e in examples)}
    return PreferenceDataset(examples, dict(skipped), truncated, name, profile)
