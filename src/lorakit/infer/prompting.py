"""Complete prompts on one base model, each prompt with its own adapter (`lorakit generate`).

The base model is loaded once and every adapter is loaded onto it by name
(`lorakit.models.adapters.load_adapted`); the prompts then run together through the engine
(`lorakit.generation.engine.generate_batch`), each row with its adapter
or the base model ("base"), and the same sampling settings. Text can stream as it is produced.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

from lorakit.data.chat import chat_prompt_ids
from lorakit.errors import ConfigError
from lorakit.generation.engine import Request, Sampling, eos_token_ids, finish_reason, generate_batch
from lorakit.generation.texts import generate_texts
from lorakit.infer.compare import parse_adapter_specs
from lorakit.infer.textstream import TextStream

__all__ = ["BASE", "RESERVED", "Completion", "parse_adapters", "assign_prompts", "complete", "complete_prompts"]

BASE = "base"
"""The base model's name in a prompt's adapter choice; no adapter may take it."""

RESERVED = {BASE: "means the base model in --prompt-for"}
"""The adapter names `lorakit generate` refuses (``load_adapted(..., reserved=RESERVED)``)."""


@dataclass
class Completion:
    """One prompt's completion."""

    prompt: str
    adapter: str  # an adapter's name, or "base"
    text: str  # decoded without special tokens and without a stop token
    token_ids: list[int]  # as generated, ending with the stop token when it stopped
    finish_reason: str  # "stop" (EOS or a stop token) or "length" (max_new_tokens)

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "adapter": self.adapter, "text": self.text,
                "tokens": len(self.token_ids), "finish_reason": self.finish_reason}


def parse_adapters(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """``--adapter`` values: ``NAME=DIR`` each, or one bare ``DIR`` alone, named "default" as
    PEFT names a lone adapter. Every malformed value is reported in one ConfigError."""
    return parse_adapter_specs(specs, lone_dir=True)


def assign_prompts(prompts: Sequence[str | tuple[str, str]], adapters: Sequence[str]) -> list[tuple[str, str]]:
    """``[(adapter, text), ...]`` in order. A plain prompt runs on the one adapter, on the base model
    when there is none, and on every adapter (one completion each) when there are several; a
    ``(name, text)`` prompt runs on that adapter or, for "base", the base model."""
    if not prompts:
        raise ConfigError("nothing to complete: give at least one --prompt TEXT (or --prompt-for NAME TEXT)")
    known = list(adapters)
    plain = known or [BASE]
    assigned, unknown = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            assigned += [(name, prompt) for name in plain]
            continue
        name, text = prompt
        if name != BASE and name not in known:
            unknown.append(name)
        assigned.append((name, text))
    if unknown:
        raise ConfigError(f"--prompt-for names {', '.join(repr(n) for n in unknown)}, which is not loaded; "
                          f"choose one of {', '.join([BASE] + known)} (or load it with --adapter NAME=DIR)")
    return assigned


def complete(model, tokenizer, prompts: list[str], *, system: str | None = None, max_new_tokens: int = 128,
             batch_size: int = 16) -> list[str]:
    """Greedy completions of one-turn chat prompts (with ``system`` as the system message), as
    stripped text, with the model as it is set up (its active adapters)."""
    ids = [chat_prompt_ids(tokenizer, p, system) for p in prompts]
    return generate_texts(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)


def complete_prompts(model, tokenizer, prompts: Sequence[tuple[str, str]], *, system: str | None = None,
                     sampling: Sampling = Sampling(), on_text: Callable[[int, str], None] | None = None,
                     autocast: Callable | None = None) -> list[Completion]:
    """Complete ``(adapter, text)`` prompts (adapter "base" = the base model) as one-turn chats
    (with ``system`` as the system message), all in one batch. ``on_text(i, piece)`` receives
    prompt ``i``'s text as it is produced. A seeded ``sampling`` gives every prompt the same
    seed, so each prompt's completion is what it would be alone."""
    requests = [Request(chat_prompt_ids(tokenizer, text, system), None if name == BASE else name,
                        replace(sampling)) for name, text in prompts]
    stops = [eos_token_ids(model, tokenizer) | set(r.sampling.stop_token_ids) for r in requests]
    streams = [TextStream(tokenizer) for _ in requests]

    def on_token(i: int, token: int) -> None:
        if on_text is not None and token not in stops[i]:
            piece = streams[i].push(token)
            if piece:
                on_text(i, piece)

    outputs = generate_batch(model, tokenizer, requests, on_token=on_token, autocast=autocast)
    for i, stream in enumerate(streams):  # text held back at the end (an unfinished character)
        rest = stream.finish()
        if rest and on_text is not None:
            on_text(i, rest)
    eos = eos_token_ids(model, tokenizer)
    completions = []
    for (name, text), request, ids in zip(prompts, requests, outputs):
        reason = finish_reason(ids, request, eos)
        shown = ids[:-1] if reason == "stop" else ids
        completions.append(Completion(text, name, tokenizer.decode(shown, skip_special_tokens=True), ids, reason))
    return completions
