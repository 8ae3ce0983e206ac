"""OpenAI's request and response shapes, for `lorakit serve`.

Requests are checked here, field by field, into a `Call`: the prompts as token ids (a chat's
messages rendered by `lorakit.data.chat`, the one chat renderer), the engine's `Sampling` and the
stop strings. A request the server refuses raises
`RequestError`, which carries the HTTP status and OpenAI's error fields
(``{"error": {"message", "type", "param", "code"}}``). The response builders return OpenAI's
JSON objects: ``text_completion``, ``chat.completion``, their stream chunks, and model lists.

Every request is checked alone, before it joins a batch: a body nested deeper than
`MAX_DEPTH`, a field of the wrong type, a number out of range (``seed`` must fit a generator's
64-bit state: 0 <= seed < 2**63) or a prompt plus ``max_tokens`` beyond the model's context is
a 400 naming the field, so one client's bad request never reaches its neighbours' batch.

Differences from OpenAI: ``n``, ``best_of`` above 1, ``logprobs``, ``echo``, ``suffix`` and
``tools`` are refused with a 400 naming the field; ``top_k`` is accepted (as vLLM does);
unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from lorakit.data.chat import ChatTemplateError, chat_ids, has_chat_template
from lorakit.errors import ConfigError
from lorakit.generation.engine import Sampling

__all__ = ["RequestError", "Limits", "Call", "get_field", "parse_json", "parse_completion", "parse_chat",
           "error_body", "usage", "completion_response", "chat_response", "completion_chunk",
           "chat_chunk", "usage_chunk", "model_card", "model_list"]

_MISSING = object()

MAX_DEPTH = 32
"""The deepest a request body may nest (objects and arrays); OpenAI's requests need about 5."""

SEED_LIMIT = 2 ** 63
"""A ``seed`` is an integer in [0, SEED_LIMIT): what a 64-bit signed integer holds."""


class RequestError(ConfigError):
    """A request the server refuses: the HTTP ``status`` and OpenAI's ``type``, ``param`` and
    ``code``; the message says what was wrong and what to send instead."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class Limits:
    """What the server allows: the most new tokens a request may ask for, the context length
    (prompt plus new tokens; None when the model does not say), the most prompts in one request,
    and the temperature a request that names none gets (OpenAI's default is 1)."""

    max_tokens: int = 512
    context: int | None = None
    max_prompts: int = 8
    temperature: float = 1.0


@dataclass
class Call:
    """A checked /v1/completions or /v1/chat/completions request."""

    kind: str  # "completion" or "chat"
    model: str
    prompts: list[list[int]]  # token ids, one list per choice
    sampling: Sampling
    stop: tuple[str, ...] = ()  # stop strings, cut from the text (stop tokens are in sampling)
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object, or a RequestError saying what is wrong with it (a body
    nested deeper than `MAX_DEPTH` included: it would otherwise exhaust the parser's recursion)."""
    if not raw.strip():
        raise RequestError("the request body is empty; send a JSON object (Content-Type: application/json)")
    try:
        body = json.loads(raw)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, an integer of over 4300 digits
        raise RequestError(f"the request body is not valid JSON ({err}); send a JSON object") from None
    except RecursionError:
        body = None  # deeper than the parser goes: refused below with the depth
    if body is None or _depth(body) > MAX_DEPTH:
        raise RequestError(f"the request body nests objects and arrays more than {MAX_DEPTH} deep; send a flat "
                           "request as OpenAI's API describes", code="too_deep")
    if not isinstance(body, dict):
        raise RequestError(f"the request body is a JSON {type(body).__name__}, not an object; send a JSON object")
    return body


def _depth(value) -> int:
    """How deep ``value`` nests lists and dicts (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, (list, dict)))
    return deepest


# -- fields
def get_field(body: dict, name: str, kinds: tuple, default=_MISSING, what: str = ""):
    """``body[name]`` if it has one of ``kinds`` (null counts as absent); a bool is never a number."""
    value = body.get(name)
    if value is None:
        if default is _MISSING:
            raise RequestError(f"'{name}' is required{what}", param=name, code="missing_field")
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({str: "a string", int: "an integer", float: "a number", bool: "a boolean",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise RequestError(f"'{name}' must be {names}, got {json.dumps(value)[:80]}", param=name,
                           code="invalid_type")
    return value


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    given = get_field(body, name, (int, float), default)
    value = float(given) if not isinstance(given, int) or abs(given) < 2 ** 64 else math.inf  # no OverflowError
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise RequestError(f"'{name}' must be in {bracket}{low:g}, {high:g}], got {value:g}", param=name,
                           code="invalid_value")
    return value


def _refuse_unsupported(body: dict) -> None:
    n = get_field(body, "n", (int,), 1)
    if n != 1:
        raise RequestError(f"n={n} is not supported: each request gives one choice (n=1); send the request "
                           f"{n} times (with different seeds) for {n} samples", param="n", code="unsupported")
    best_of = get_field(body, "best_of", (int,), 1)
    if best_of != 1:
        raise RequestError("best_of is not supported; leave it out", param="best_of", code="unsupported")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "tools", "functions", "logit_bias"):
        value = body.get(name)
        if value not in (None, False, "", [], {}):
            raise RequestError(f"'{name}' is not supported by lorakit serve; leave it out", param=name,
                               code="unsupported")


def _stop(body: dict, tokenizer) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The stop strings, and the token ids of those that are exactly one token (so that the
    engine ends the row there instead of generating past it)."""
    value = body.get("stop")
    stops = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise RequestError("'stop' must be a non-empty string or an array of up to 4 non-empty strings",
                           param="stop", code="invalid_value")
    ids = []
    for s in stops:
        encoded = tokenizer.encode(s, add_special_tokens=False)
        if len(encoded) == 1 and tokenizer.decode(encoded) == s:
            ids.append(encoded[0])
    return tuple(stops), tuple(ids)


def _common(body: dict, kind: str, prompts: list[list[int]], tokenizer, limits: Limits,
            default_max_tokens: int) -> Call:
    """The fields completions and chat share: model, sampling, stop, stream."""
    _refuse_unsupported(body)
    model = get_field(body, "model", (str,))
    max_tokens = get_field(body, "max_tokens", (int,), None)
    if kind == "chat":
        max_tokens = get_field(body, "max_completion_tokens", (int,), max_tokens)
    max_tokens = default_max_tokens if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= limits.max_tokens:
        raise RequestError(f"'max_tokens' must be between 1 and {limits.max_tokens} (the server's --max-tokens), "
                           f"got {str(max_tokens)[:40]}", param="max_tokens", code="invalid_value")
    longest = max(len(p) for p in prompts)
    if limits.context is not None and longest + max_tokens > limits.context:
        raise RequestError(f"the prompt ({longest} tokens) plus max_tokens ({max_tokens}) is more than the model's "
                           f"context of {limits.context} tokens; shorten the prompt or lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")
    stops, stop_ids = _stop(body, tokenizer)
    seed = get_field(body, "seed", (int,), None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise RequestError(f"'seed' must be an integer from 0 to 2**63 - 1, got {str(seed)[:40]}", param="seed",
                           code="invalid_value")
    top_k = get_field(body, "top_k", (int,), 0)
    if top_k < 0:
        raise RequestError(f"'top_k' must be 0 (off) or more, got {str(top_k)[:40]}", param="top_k",
                           code="invalid_value")
    top_k = min(top_k, len(tokenizer))  # more than the vocabulary keeps every token, as the vocabulary does
    temperature = _number(body, "temperature", limits.temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    try:
        sampling = Sampling(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, max_new_tokens=max_tokens,
                            stop_token_ids=stop_ids)
    except ConfigError as err:  # what the engine itself refuses, this request's fault alone
        raise RequestError(str(err), code="invalid_value") from None
    stream = get_field(body, "stream", (bool,), False)
    options = get_field(body, "stream_options", (dict,), {})
    if options and not stream:
        raise RequestError("'stream_options' is only allowed with stream=true", param="stream_options")
    include_usage = get_field(options, "include_usage", (bool,), False)
    return Call(kind, model, prompts, sampling, stops, stream, include_usage)


def parse_completion(body: dict, tokenizer, limits: Limits) -> Call:
    """/v1/completions: ``prompt`` is a string, an array of strings, an array of token ids, or an
    array of such arrays; each prompt gets one choice (``index`` = its position)."""
    prompt = get_field(body, "prompt", (str, list))
    items = [prompt] if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)) else prompt
    if not items:
        raise RequestError("'prompt' is an empty array; send a string or an array of strings", param="prompt")
    if len(items) > limits.max_prompts:
        raise RequestError(f"'prompt' holds {len(items)} prompts; at most {limits.max_prompts} (the server's "
                           "--max-batch) per request", param="prompt", code="too_many_prompts")
    vocab = len(tokenizer)
    prompts = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer(item)["input_ids"]
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab
                                            for t in item):
            ids = list(item)
        else:
            raise RequestError(f"'prompt' must be a string, an array of strings or of token ids (0 to {vocab - 1}); "
                               f"got {json.dumps(item)[:80]}", param="prompt", code="invalid_type")
        if not ids:
            raise RequestError("a prompt is empty (no tokens); send some text", param="prompt", code="invalid_value")
        prompts.append(ids)
    return _common(body, "completion", prompts, tokenizer, limits, default_max_tokens=min(16, limits.max_tokens))


def _messages(body: dict) -> list[dict]:
    messages = get_field(body, "messages", (list,))
    if not messages:
        raise RequestError("'messages' is empty; send at least one {\"role\": \"user\", \"content\": ...}",
                           param="messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", param=where,
                               code="invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"{where}.role must be one of system, developer, user, assistant; got "
                               f"{json.dumps(role)}", param=f"{where}.role", code="invalid_value")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise RequestError(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}} "
                                   "(only text is supported)", param=f"{where}.content", code="invalid_type")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string", param=f"{where}.content", code="invalid_type")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation's prompt ids (`lorakit.data.chat.chat_ids`); a conversation the tokenizer
    cannot render is the request's fault (a 400)."""
    try:
        return chat_ids(tokenizer, messages)
    except ChatTemplateError as err:
        if not has_chat_template(tokenizer):
            raise RequestError("this model's tokenizer has no chat template, so only a single user message can be "
                               "sent; use /v1/completions with the prompt written out", param="messages",
                               code="no_chat_template") from None
        raise RequestError(f"{err}; check the messages' roles and order", param="messages",
                           code="invalid_value") from None


def parse_chat(body: dict, tokenizer, limits: Limits) -> Call:
    """/v1/chat/completions: ``messages`` rendered with the chat template; one choice."""
    ids = _chat_ids(tokenizer, _messages(body))
    return _common(body, "chat", [ids], tokenizer, limits, default_max_tokens=limits.max_tokens)


# -- responses
def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(id: str, created: int, model: str, choices: list[tuple[str, str]], use: dict) -> dict:
    """``choices``: (text, finish_reason) per prompt."""
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                        for i, (text, finish) in enumerate(choices)],
            "usage": use}


def chat_response(id: str, created: int, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": use}


def completion_chunk(id: str, created: int, model: str, index: int, text: str, finish: str | None) -> dict:
    return {"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}


def chat_chunk(id: str, created: int, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(id: str, created: int, model: str, kind: str, use: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": id, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def model_card(id: str, created: int, parent: str | None = None, root: str | None = None) -> dict:
    card = {"id": id, "object": "model", "created": created, "owned_by": "lorakit"}
    if parent is not None:
        card.update(parent=parent, root=root)
    return card


def model_list(cards: list[dict]) -> dict:
    return {"object": "list", "data": cards}
