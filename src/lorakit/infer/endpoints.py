"""The server's endpoints: each reads its request from the handler, and sends OpenAI's answer or
raises `RequestError` (which the handler sends as OpenAI's error object).

Generation endpoints check the body into a `Call` (`lorakit.infer.openai_api`), queue a `Job`
on the server's `Scheduler` and wait for its events: the whole answer at the end, or with
``"stream": true`` Server-Sent Events as the tokens come. Adapter changes are queued the same
way and answered once the worker has applied them, between two batches.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ConfigError, LorakitError
from lorakit.infer import openai_api as api
from lorakit.infer.openai_api import RequestError
from lorakit.infer.scheduler import AdapterChange, Job
from lorakit.io import check_adapter_name

if TYPE_CHECKING:
    from lorakit.infer.server import Server, _Handler

__all__ = ["ROUTES"]


def _models(app: Server, h: "_Handler") -> None:
    h.send_json(200, api.model_list([app.card(m) for m in app.model_ids()]))


def _model(app: Server, h: "_Handler", name: str) -> None:
    app.resolve(name)
    h.send_json(200, app.card(name))


def _health(app: Server, h: "_Handler") -> None:
    h.send_json(200, {"status": "ok"})


def _completions(app: Server, h: "_Handler") -> None:
    _generate(app, h, api.parse_completion(h.read_json(), app.tokenizer, app.limits))


def _chat(app: Server, h: "_Handler") -> None:
    _generate(app, h, api.parse_chat(h.read_json(), app.tokenizer, app.limits))


def _generate(app: Server, h: "_Handler", call: api.Call) -> None:
    job = Job.from_call(call, app.resolve(call.model), app.tokenizer)
    app.scheduler.submit(job)
    rid = ("chatcmpl-" if call.kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    event = job.events.get()
    if event[0] == "error":
        raise event[1]
    if call.stream:
        return _stream(app, h, job, rid, event)
    while event[0] != "done":  # text events come only when streaming
        event = job.events.get()
        if event[0] == "error":
            raise event[1]
    use = api.usage(sum(len(r.prompt_ids) for r in job.rows), sum(r.completion_tokens for r in job.rows))
    if call.kind == "chat":
        row = job.rows[0]
        h.send_json(200, api.chat_response(rid, app.created, call.model, row.stream.text, row.finish_reason, use))
    else:
        choices = [(r.stream.text, r.finish_reason) for r in job.rows]
        h.send_json(200, api.completion_response(rid, app.created, call.model, choices, use))


def _stream(app: Server, h: "_Handler", job: Job, rid: str, event: tuple) -> None:
    """Send the job's events as Server-Sent Events, as they come, from the first one on."""
    call, created = job.call, app.created
    index = {id(row): i for i, row in enumerate(job.rows)}
    chat = call.kind == "chat"
    try:
        h.start_events()
        if chat:
            h.send_event(api.chat_chunk(rid, created, call.model, {"role": "assistant", "content": ""}, None))
        while True:
            kind, row, piece = event
            if kind == "text":
                h.send_event(api.chat_chunk(rid, created, call.model, {"content": piece}, None) if chat else
                             api.completion_chunk(rid, created, call.model, index[id(row)], piece, None))
            elif kind == "finish":  # this choice is complete (the others may go on)
                h.send_event(api.chat_chunk(rid, created, call.model, {}, row.finish_reason) if chat else
                             api.completion_chunk(rid, created, call.model, index[id(row)], "", row.finish_reason))
            elif kind == "error":
                h.send_event(row.body())  # the RequestError
                break
            else:  # done: every choice is complete
                if call.include_usage:
                    use = api.usage(sum(len(r.prompt_ids) for r in job.rows),
                                    sum(r.completion_tokens for r in job.rows))
                    h.send_event(api.usage_chunk(rid, created, call.model, call.kind, use))
                break
            event = job.events.get()
        h.send_event("[DONE]")
    except (BrokenPipeError, ConnectionResetError):
        job.cancelled = True  # the client left; the batch finishes without it


def _add_adapter(app: Server, h: "_Handler") -> None:
    body = h.read_json()
    name = api.get_field(body, "name", (str,))
    path = api.get_field(body, "path", (str,))
    try:
        check_adapter_name(name)
    except ConfigError as err:
        raise RequestError(str(err), param="name", code="invalid_value") from None
    if name in app.base_names:
        raise RequestError(f"{name!r} names the base model; pick another adapter name", param="name",
                           code="invalid_value")
    if not Path(path, "adapter_config.json").is_file():
        raise RequestError(f"no adapter at {path!r}: it must be a directory on the server's machine holding "
                           "adapter_config.json (relative paths start where the server was started)",
                           param="path", code="adapter_not_found")
    _change(app, AdapterChange(name, path))
    h.send_json(200, app.card(name))


def _remove_adapter(app: Server, h: "_Handler", name: str) -> None:
    if name not in app.scheduler.adapters:
        raise RequestError(f"no adapter named {name!r} is served; adapters: "
                           f"{', '.join(app.scheduler.adapters) or 'none'}", status=404, param="name",
                           code="model_not_found")
    _change(app, AdapterChange(name))
    h.send_json(200, {"id": name, "object": "model", "deleted": True})


def _change(app: Server, change: AdapterChange) -> None:
    """Queue an adapter change (it runs between batches) and wait for it."""
    app.scheduler.submit(change)
    change.done.wait()
    err = change.error
    if isinstance(err, RequestError):
        raise err
    if isinstance(err, LorakitError):
        raise RequestError(str(err), param="path", code="adapter_invalid")
    if err is not None:
        raise RequestError(f"changing adapter {change.name!r} failed: {type(err).__name__}: {err}", status=500,
                           type="server_error", code="internal_error")


ROUTES = [  # (method, path, endpoint(app, handler, *path parts))
    ("GET", re.compile(r"/v1/models"), _models),
    ("GET", re.compile(r"/v1/models/([^/]+)"), _model),
    ("POST", re.compile(r"/v1/completions"), _completions),
    ("POST", re.compile(r"/v1/chat/completions"), _chat),
    ("POST", re.compile(r"/v1/adapters"), _add_adapter),
    ("DELETE", re.compile(r"/v1/adapters/([^/]+)"), _remove_adapter),
    ("GET", re.compile(r"/health"), _health),
]
