"""The one chat renderer: messages through the tokenizer's chat template, to text or prompt ids.

Training labels (`lorakit.data.encode`), one-turn prompts (`lorakit generate`, scoring) and the
server's conversations (`/v1/chat/completions`) all render here, and a tokenizer without a
template, or a template that refuses the conversation, raises the one `ChatTemplateError`.

A prompt ends in the assistant's header (``add_generation_prompt=True``) and is tokenized
without special tokens (the template writes its own). Without a template, a lone user message
is read as plain text (tokenized with the tokenizer's special tokens, as any text is).
"""

from __future__ import annotations

from typing import Sequence

from ..errors import DataError

__all__ = ["ChatTemplateError", "has_chat_template", "render_chat", "chat_ids", "chat_prompt_ids"]


class ChatTemplateError(DataError):
    """The tokenizer has no chat template, or its template refuses the conversation."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence[dict], *, generation_prompt: bool = False) -> str:
    """``messages`` rendered as text by the tokenizer's chat template; with ``generation_prompt``
    the text ends in the assistant's header, ready for the answer."""
    if not has_chat_template(tokenizer):
        raise ChatTemplateError("the tokenizer has no chat template; use a chat model or prompt/completion records")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # templates raise their own errors ("roles must alternate", ...)
        raise ChatTemplateError(f"the chat template refused the conversation: {exc}") from None


def chat_ids(tokenizer, messages: Sequence[dict]) -> list[int]:
    """The token ids of a conversation ending in the assistant's header. Without a chat template
    only a lone user message can be sent: its text, as plain text."""
    if not has_chat_template(tokenizer) and len(messages) == 1 and messages[0]["role"] == "user":
        return tokenizer(messages[0]["content"])["input_ids"]
    text = render_chat(tokenizer, messages, generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The token ids of a one-turn chat (``system`` first, when given) ending in the assistant's
    header; without a chat template, the prompt as plain text (a system message has no place in
    it and is left out)."""
    if not has_chat_template(tokenizer):
        return chat_ids(tokenizer, [{"role": "user", "content": prompt}])
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return chat_ids(tokenizer, messages)
