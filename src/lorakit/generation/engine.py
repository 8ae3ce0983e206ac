"""The generation engine: many requests in one batch, each with its own adapter and sampling.

On a Llama-family model the requests run on the fast decoder (`lorakit.generation.decoder`,
through `lorakit.generation.batcher`): fp32, or bf16 when ``autocast`` is bf16 autocast. Otherwise
(and with ``fast=False``, or ``as_is``) all requests run together in one left-padded batch over
the model's own KV cache::

    prefill   logits, cache = model(prompts, mask, positions)             # (B, T) -> (B, V)
    decode    logits, cache = model(last tokens, mask + 1, positions + 1) # (B, 1) -> (B, V)

Left padding shifts each row's tokens to the right, so positions come from the attention mask
(``cumsum(mask) - 1``, as transformers' ``generate`` computes them) and every row sees its own
prompt at positions 0..len-1. Each row stops on its own (at EOS, at one of its stop tokens, or
after its ``max_new_tokens``) and leaves the batch: its row is dropped from the batch and from the
cache, so the rows still generating do not pay for it.

Each row picks its next token by its own `Sampling`: greedy (``temperature=0``, the argmax) or
sampled from ``softmax(warp(logits))`` with a `torch.Generator` of its own, seeded by
``Sampling.seed``, so a row's draws do not depend on its batch neighbours. ``warp`` is
transformers' temperature, then top-k, then top-p (nucleus, Holtzman et al. 2019) warping.
Greedy output equals ``model.generate(do_sample=False)`` on the prompt alone, and a seeded row
equals ``torch.manual_seed(seed); model.generate(do_sample=True, ...)`` alone (on CPU).

Each row's adapter: one adapter (or the base model) for every row is the plain PEFT way
(``set_adapter`` / ``disable_adapter``, restored afterwards); different adapters per row use
`lorakit.batching.mixed_batch`, where every forward takes its row's adapter.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Sequence

import torch

from lorakit.batching import BASE, mixed_batch
from lorakit.errors import ConfigError
from lorakit.generation.batcher import Batcher
from lorakit.generation.decoder import Decoder, autocast_dtype, unsupported
from lorakit.generation.sampling import (Request, Sampling, eos_token_ids, finish_reason, generator, is_int,
                                         next_tokens, pad_token_id, row_ended, warp_logits)

__all__ = ["Sampling", "Request", "generate_batch", "warp_logits", "eos_token_ids", "row_ended", "finish_reason",
           "left_pad", "BASE"]


@torch.no_grad()
def generate_batch(model, tokenizer, requests: Sequence[Request], *,
                   on_token: Callable[[int, int], None] | None = None,
                   autocast: Callable | None = None, as_is: bool = False, fast: bool = True) -> list[list[int]]:
    """Complete every request in one batch; the generated ids per request, in order.

    ``on_token(i, token_id)`` is called for each token as it is produced (request ``i``'s
    tokens in order), for streaming; returning False from it ends request ``i`` there (a
    client that went away). A row's ids end with the token that stopped it (EOS or
    one of its ``stop_token_ids``, as transformers' ``generate`` keeps EOS) unless it ran
    to ``max_new_tokens``; `finish_reason` tells which. ``autocast``: a callable giving a
    context manager for the forward passes (e.g. bf16 autocast). ``tokenizer`` gives the EOS and
    padding ids (with the model's generation config); None: the model's alone. The model runs
    in eval mode and is put back as it was, with its active adapters. ``as_is``: every row runs
    the model as it is set up (its active adapters, or the base model inside ``disable_adapter()``),
    for requests whose ``adapter`` is None; the engine then leaves the adapters alone.

    ``fast``: run a Llama-family model on the fast decoder (`lorakit.generation.decoder`: packed
    weights, a static KV cache, continuous batching), in bf16 when ``autocast`` is bf16 autocast,
    else fp32; other models, ``as_is`` and ``fast=False`` run the model's own forward below.
    """
    requests = list(requests)
    if not requests:
        return []
    _check_requests(model, requests, as_is)
    if fast and not as_is and unsupported(model) is None:
        return _generate_fast(model, tokenizer, requests, on_token, autocast_dtype(autocast, next(model.parameters()).device))
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad = pad_token_id(model, tokenizer, eos)
    generators = [generator(r.sampling.seed, device) for r in requests]

    ids, mask = left_pad([r.prompt_ids for r in requests], pad)  # (B, T), (B, T)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): each prompt at 0..len-1
    cache_arg, extra = _forward_arguments(model)
    cache = None
    outputs: list[list[int]] = [[] for _ in requests]
    live = list(range(len(requests)))  # the requests still generating, in the batch's row order
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as adapters:
            adapters.enter_context(_adapters(model, [requests[i].adapter for i in live], as_is))
            while True:
                with autocast() if autocast else contextlib.nullcontext():
                    result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                   **({cache_arg: cache} if cache is not None else {}), **extra)
                cache = result[cache_arg]
                logits = result.logits[:, -1, :].float()  # (rows, V)
                tokens = next_tokens(logits, [requests[i].sampling for i in live], [generators[i] for i in live])
                finished = set()
                for i, token in zip(live, tokens):
                    outputs[i].append(token)
                    cancelled = on_token is not None and on_token(i, token) is False
                    if cancelled or row_ended(outputs[i], requests[i], eos):
                        finished.add(i)
                keep = [row for row, i in enumerate(live) if i not in finished]
                if not keep:
                    break
                if finished:  # drop the finished rows from the batch and its cache
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    mask, positions = mask[index], positions[index]
                    live = [live[row] for row in keep]
                    adapters.close()
                    adapters.enter_context(_adapters(model, [requests[i].adapter for i in live], as_is))
                ids = torch.tensor([outputs[i][-1] for i in live], device=device).unsqueeze(1)  # (rows, 1)
                mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # (rows, T + steps)
                positions = positions[:, -1:] + 1  # (rows, 1)
    finally:
        model.train(was_training)
    return outputs


def _generate_fast(model, tokenizer, requests: list[Request], on_token, dtype: torch.dtype) -> list[list[int]]:
    """`generate_batch` on the fast decoder: up to ``_MAX_ROWS`` requests step together, and each
    one that ends gives its place to the next waiting (the rows' tokens do not depend on that)."""
    longest = max(len(r.prompt_ids) + r.sampling.max_new_tokens for r in requests)
    decoder = Decoder(model, slots=min(len(requests), _MAX_ROWS), capacity=longest, dtype=dtype,
                      prefix_cache_bytes=0)
    batcher = Batcher(model, tokenizer, decoder)
    waiting = list(range(len(requests)))[::-1]
    outputs: list[list[int]] = [[] for _ in requests]
    while waiting or len(batcher):
        while waiting and batcher.free:
            i = waiting.pop()
            batcher.add(i, requests[i])
        for i, token, ended in sorted(batcher.step()):  # in request order, as the model's loop
            outputs[i].append(token)
            if on_token is not None and on_token(i, token) is False and not ended:
                batcher.drop(i)
    return outputs


_MAX_ROWS = 64
"""The most rows `generate_batch` steps together on the fast decoder (each holds its own KV cache)."""


def left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both (B, longest): each prompt right-aligned, padding on the left."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def _forward_arguments(model) -> tuple[str, dict]:
    """The KV cache's argument name (transformers 5.x calls it ``cache``; earlier releases
    ``past_key_values``) and ``logits_to_keep=1`` where the model takes it (the prefill then
    computes the LM head for the last position only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def _check_requests(model, requests: list[Request], as_is: bool) -> None:
    """Every problem with the requests, in one ConfigError."""
    problems = []
    embeddings = model.get_input_embeddings()
    vocab = getattr(embeddings, "base_layer", embeddings).num_embeddings  # through a LoRA-wrapped embedding
    peft_config = getattr(model, "peft_config", None)
    known = sorted(peft_config) if isinstance(peft_config, dict) else []
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            problems.append(f"request {i} is a {type(r).__name__}, not a lorakit.generation.engine.Request")
            continue
        if not r.prompt_ids:
            problems.append(f"request {i} has an empty prompt; give at least one token id")
        elif not all(is_int(t) and 0 <= t < vocab for t in r.prompt_ids):
            problems.append(f"request {i}'s prompt has ids that are not integers in the vocabulary [0, {vocab}); "
                            "tokenize with the model's own tokenizer")
        if as_is and r.adapter is not None:
            problems.append(f"request {i} asks for adapter {r.adapter!r}, but as_is=True runs the model as it is "
                            "set up; leave the request's adapter None")
        elif r.adapter not in (None, BASE) and r.adapter not in known:
            problems.append(f"request {i} asks for adapter {r.adapter!r}, which the model does not have "
                            f"(adapters: {known or 'none, it is a plain model'}; None = the base model)")
    if problems:
        raise ConfigError("generate_batch: " + "; ".join(problems))


@contextlib.contextmanager
def _adapters(model, names: list[str | None], as_is: bool = False):
    """Inside: row i uses adapter names[i] (None = the base model); ``as_is``: the model as it is."""
    rows = [BASE if n is None else n for n in names]
    if as_is or not isinstance(getattr(model, "peft_config", None), dict):  # a plain model: every row is the base
        yield
    elif all(n == BASE for n in rows):
        with model.disable_adapter():
            yield
    elif len(set(rows)) == 1:
        with _only(model, rows[0]):
            yield
    else:
        with mixed_batch(model, rows, rows=len(rows)):
            yield


@contextlib.contextmanager
def _only(model, name: str):
    """``set_adapter(name)`` for the block; the active adapters and what was trainable restored."""
    previous = model.active_adapters
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.set_adapter(name)
    try:
        yield
    finally:
        model.set_adapter(previous)
        for p in model.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
