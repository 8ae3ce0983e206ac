"""Greedy completions as text, for scoring: many token-id prompts through the engine, in batches.

Prompts run longest first, ``batch_size`` at a time, so that each batch pads little; the texts
come back in the prompts' order. Each row is the engine's greedy decode of its prompt alone
(`lorakit.generation.engine.generate_batch`), which is ``model.generate(do_sample=False)``.
A one-line answer (task-api's JSON) stops at its first line break: every token whose text holds
one is a stop token (`line_break_ids`), and the text is cut there.
"""

from __future__ import annotations

from typing import Callable, Sequence

from lorakit.generation.engine import Request, Sampling, generate_batch

__all__ = ["generate_texts", "line_break_ids"]


def line_break_ids(tokenizer) -> tuple[int, ...]:
    """Every token whose text contains a line break (one decode of the whole vocabulary, about a
    second for 49,152 tokens: compute it once and pass it to each `generate_texts` call)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return tuple(i for i, text in enumerate(texts) if "\n" in text)


def generate_texts(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   batch_size: int = 32, autocast: Callable | None = None, one_line: bool = False,
                   line_breaks: Sequence[int] | None = None) -> list[str]:
    """Greedy completions of token-id prompts, decoded without special tokens and stripped. With
    ``one_line``, a row stops at its first line break (``line_breaks``: the ids of `line_break_ids`,
    computed here when None) and the text is cut there. The model runs as it is set up (its
    active adapters, or the base model inside ``disable_adapter()``)."""
    stops = tuple(line_break_ids(tokenizer) if line_breaks is None else line_breaks) if one_line else ()
    sampling = Sampling(max_new_tokens=max_new_tokens, stop_token_ids=stops)  # greedy
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first
    texts: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        outputs = generate_batch(model, tokenizer, [Request(list(prompts[i]), sampling=sampling) for i in chunk],
                                 autocast=autocast, as_is=True)
        for i, ids in zip(chunk, outputs):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            texts[i] = (text.strip().split("\n", 1)[0] if one_line else text).strip()
    return [texts[i] for i in range(len(prompts))]
