"""Load a base model with an adapter on it, and complete prompts with it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from lorakit.config import LoraConfig
from lorakit.infer.engine import left_pad
from lorakit.model import PeftModel
from lorakit.models import load_model

__all__ = ["load_adapted", "chat_prompt_ids", "generate_texts", "complete"]


def load_adapted(adapter_dir: str | os.PathLike, model: str | None = None):
    """(PeftModel, tokenizer): the base model (``model``, else the adapter's
    ``base_model_name_or_path``) with the adapter loaded, frozen and in eval mode."""
    adapter_dir = Path(adapter_dir)
    base_name = model or LoraConfig.from_pretrained(adapter_dir).base_model_name_or_path or "smollm2-135m"
    base, tokenizer = load_model(base_name)
    return PeftModel.from_pretrained(base, adapter_dir), tokenizer


def chat_prompt_ids(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    """The token ids of a one-turn chat ending in the assistant header (plain text without a
    chat template)."""
    if not getattr(tokenizer, "chat_template", None):
        return tokenizer(prompt)["input_ids"]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def newline_token_ids(tokenizer) -> list[int]:
    """Every token whose text contains a line break (computed once per tokenizer)."""
    cached = getattr(tokenizer, "_lorakit_newline_ids", None)
    if cached is None:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        cached = [i for i, text in enumerate(texts) if "\n" in text]
        tokenizer._lorakit_newline_ids = cached
    return cached


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int,
                   batch_size: int = 32, autocast: Callable | None = None,
                   one_line: bool = False) -> list[str]:
    """Greedy completions of token-id prompts, batched with left padding. With ``one_line``,
    a row stops at its first line break and the text is cut there (for one-line answers)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    # Longest first so each batch pads little; results are put back in order.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    texts: dict[int, str] = {}
    stop = [tokenizer.eos_token_id] + (newline_token_ids(tokenizer) if one_line else [])
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([prompts[i] for i in chunk], pad)  # (B, width) each
        width = ids.shape[1]
        with autocast() if autocast else contextlib.nullcontext():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad, eos_token_id=stop)
        for row, i in enumerate(chunk):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            texts[i] = (text.strip().split("\n", 1)[0] if one_line else text).strip()
    model.train(was_training)
    return [texts[i] for i in range(len(prompts))]


def complete(model, tokenizer, prompts: list[str], *, system: str | None = None, max_new_tokens: int = 128,
             batch_size: int = 16) -> list[str]:
    """Greedy completions of chat prompts."""
    ids = [chat_prompt_ids(tokenizer, p, system) for p in prompts]
    return generate_texts(model, tokenizer, ids, max_new_tokens=max_new_tokens, batch_size=batch_size)
