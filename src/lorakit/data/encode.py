"""Turn a Record into token ids and labels: what the model reads, and which tokens it learns.

``labels[i]`` is ``input_ids[i]`` where the loss applies and ``IGNORE_INDEX`` (-100) elsewhere:

- text: every token, then EOS;
- prompt/completion: the completion's tokens and EOS; the prompt is masked;
- chat: the assistant turns, each with its end-of-turn token (``<|im_end|>`` for SmolLM2) so the
  model learns to stop; system and user turns, role headers and the whitespace between turns are
  masked.

Chat labels are found by rendering, not by knowing the template: the template renders the
conversation up to assistant turn k (with the generation prompt) and up to its end, and the
characters between those two renders, less trailing whitespace, are the turn. Tokens of the
whole conversation whose character offsets fall inside a turn are labelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from .chat import ChatTemplateError, render_chat
from .records import Record, RecordError

__all__ = ["IGNORE_INDEX", "Example", "encode_record", "assistant_spans"]

IGNORE_INDEX = -100  # the label PyTorch's cross-entropy (and transformers) skips


@dataclass(frozen=True)
class Example:
    """One tokenized example: ids, labels (IGNORE_INDEX where no loss), and where it came from."""

    input_ids: list[int]
    labels: list[int]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that are prediction targets (the first position never is: nothing precedes it)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def _render(tokenizer, messages, *, generation_prompt: bool = False) -> str:
    try:
        return render_chat(tokenizer, messages, generation_prompt=generation_prompt)
    except ChatTemplateError as exc:  # no template, or the template refused: this record is unusable
        raise RecordError("template_mismatch", str(exc)) from None


def assistant_spans(tokenizer, messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the ``[start, end)`` character span of each assistant turn.

    A span runs from the end of the assistant header to the end of the turn's end-of-turn token
    (trailing whitespace after it, such as ChatML's newline, is excluded).
    """
    text = _render(tokenizer, messages)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], generation_prompt=True)
        through = _render(tokenizer, messages[: k + 1])
        if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
            raise RecordError(
                "template_mismatch",
                f"the chat template renders messages[:{k}] differently inside the whole conversation",
            )
        end = len(through.rstrip())
        spans.append((len(before), end))
    return text, spans


def _encode_chat(tokenizer, messages) -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    labels = [IGNORE_INDEX] * len(ids)
    for i, (start, end) in enumerate(enc["offset_mapping"]):
        if end > start and any(lo <= start and end <= hi for lo, hi in spans):
            labels[i] = ids[i]
    return ids, labels


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def encode_record(record: Record, tokenizer) -> Example:
    """Tokenize ``record`` at full length (truncation is the caller's policy)."""
    if record.kind == "chat":
        ids, labels = _encode_chat(tokenizer, record.messages)
    elif record.kind == "completion":
        prompt = tokenizer(record.prompt, add_special_tokens=True)["input_ids"]  # BOS, if the model uses one
        completion = tokenizer(record.completion, add_special_tokens=False)["input_ids"] + _eos(tokenizer)
        ids, labels = prompt + completion, [IGNORE_INDEX] * len(prompt) + completion
    else:
        ids = tokenizer(record.text, add_special_tokens=True)["input_ids"] + _eos(tokenizer)
        labels = list(ids)
    return Example(list(ids), labels, record.source)
