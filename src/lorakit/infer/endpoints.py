"""The server's endpoints: each reads its request from the handler, and sends OpenAI's answer or
raises `RequestError` (which the handler sends as OpenAI's error object).

Generation endpoints check the body into a `Call` (`lorakit.infer.openai_api`), queue a `Job`
on the server's `Scheduler` and wait for its events: the whole answer at the end, or with
``"stream": true`` Server-Sent Events as the tokens come. Adapter changes are queued the same
way and answered once the worker has applied them, between two batches.

Adapters are loaded over HTTP only from the server's ``--adapter-dir`` (off without one), by
name: a client sends one directory name under it, never a path, and the name must resolve
(symlinks followed) to a directory inside it. Answers and errors never show a server path, and
every name that is not a loadable adapter inside the directory gets the same 404, so a client
cannot learn what exists elsewhere on the server's disk.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple

from lorakit.errors import ConfigError, LorakitError
from lorakit.infer import openai_api as api
from lorakit.infer.openai_api import RequestError
from lorakit.infer.scheduler import AdapterChange, Job
from lorakit.io import check_adapter_name

if TYPE_CHECKING:
    from lorakit.infer.server import Server, _Handler

__all__ = ["ROUTES", "Route", "find_adapter"]


class Route(NamedTuple):
    """One endpoint: ``endpoint(app, handler, *path parts)`` answers ``method`` on a path that
    ``pattern`` matches in full (its groups are the path parts, percent-decoded). A ``public``
    route is open without the API key (a path is public when any route for it is)."""

    method: str
    pattern: re.Pattern
    endpoint: Callable[..., None]
    public: bool = False


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
    """``{"name": NAME}`` loads ``--adapter-dir``/NAME (a directory with adapter_config.json, or a
    training run's directory with ``adapter/``) under NAME; ``"adapter": DIRNAME`` loads another
    directory of it under NAME."""
    _adapter_api_on(app)
    body = h.read_json()
    name = api.get_field(body, "name", (str,))
    if "path" in body:
        raise RequestError("'path' is not accepted: clients name adapters, never paths; send 'adapter', the name "
                           "of a directory in the server's --adapter-dir (or just 'name' when they are the same)",
                           param="path", code="invalid_value")
    source = api.get_field(body, "adapter", (str,), name)
    try:
        check_adapter_name(name)
    except ConfigError as err:
        raise RequestError(str(err), param="name", code="invalid_value") from None
    if name in app.base_names:
        raise RequestError(f"{name!r} names the base model; pick another adapter name", param="name",
                           code="invalid_value")
    param = "adapter" if "adapter" in body else "name"
    directory = find_adapter(app.adapter_dir, source, param)
    _change(app, AdapterChange(name, str(directory)), shown={str(directory): source, str(app.adapter_dir): "."})
    h.send_json(200, app.card(name))


def find_adapter(root: Path, source: str, param: str) -> Path:
    """The adapter directory ``root``/``source`` (or its ``adapter/``, a training run's), resolved
    and inside ``root``; ``source`` must be one plain directory name."""
    if (not source or source in (".", "..") or "/" in source or "\\" in source or "\0" in source
            or os.path.isabs(source) or len(source) > 255):
        raise RequestError(f"'{param}' is not an adapter name: send the name of one directory in the server's "
                           "--adapter-dir (not a path: no '/', '\\' or '..')", param=param, code="invalid_value")
    for candidate in (root / source, root / source / "adapter"):
        try:
            resolved = candidate.resolve()
            if resolved.is_relative_to(root) and resolved != root and (resolved / "adapter_config.json").is_file():
                return resolved
        except (OSError, RuntimeError):  # unreadable, or a symlink loop: as if absent
            continue
    raise RequestError(f"no adapter named {source!r} in the server's --adapter-dir (a directory holding "
                       "adapter_config.json, or a training run's directory holding adapter/)", status=404,
                       param=param, code="adapter_not_found")


def _adapter_api_on(app: Server) -> None:
    if app.adapter_dir is None:
        raise RequestError("adding and removing adapters over HTTP is off; start the server with --adapter-dir DIR "
                           "to let clients load the adapters in DIR by name", status=403, code="adapters_disabled")


def _remove_adapter(app: Server, h: "_Handler", name: str) -> None:
    _adapter_api_on(app)
    if name not in app.scheduler.adapters:
        raise RequestError(f"no adapter named {name!r} is served; adapters: "
                           f"{', '.join(app.scheduler.adapters) or 'none'}", status=404, param="name",
                           code="model_not_found")
    _change(app, AdapterChange(name))
    h.send_json(200, {"id": name, "object": "model", "deleted": True})


def _change(app: Server, change: AdapterChange, shown: dict[str, str] | None = None) -> None:
    """Queue an adapter change (it runs between batches) and wait for it; in an error's message,
    each server path in ``shown`` is replaced by what the client may see."""
    app.scheduler.submit(change)
    change.done.wait()
    err = change.error
    if isinstance(err, RequestError):
        raise err
    if err is None:
        return
    message = str(err) if isinstance(err, LorakitError) else f"{type(err).__name__}: {err}"
    for path, name in sorted((shown or {}).items(), key=lambda item: -len(item[0])):
        message = message.replace(path, name)
    if isinstance(err, LorakitError):
        raise RequestError(message, param="adapter", code="adapter_invalid")
    raise RequestError(f"changing adapter {change.name!r} failed: {message}", status=500, type="server_error",
                       code="internal_error")


ROUTES = [
    Route("GET", re.compile(r"/v1/models"), _models),
    Route("GET", re.compile(r"/v1/models/([^/]+)"), _model),
    Route("POST", re.compile(r"/v1/completions"), _completions),
    Route("POST", re.compile(r"/v1/chat/completions"), _chat),
    Route("POST", re.compile(r"/v1/adapters"), _add_adapter),
    Route("DELETE", re.compile(r"/v1/adapters/([^/]+)"), _remove_adapter),
    Route("GET", re.compile(r"/health"), _health, public=True),
]
