"""`lorakit serve`: an OpenAI-compatible HTTP server over one base model and its adapters.

Endpoints (`lorakit.infer.endpoints`; JSON in, JSON out in OpenAI's shapes, `lorakit.infer.openai_api`):

    POST   /v1/completions        prompt (string, strings or token ids) -> text_completion
    POST   /v1/chat/completions   messages, rendered with the chat template -> chat.completion
    GET    /v1/models             the base model and each adapter
    GET    /v1/models/NAME        one of them
    POST   /v1/adapters           {"name": ..., "path": ...}: load an adapter directory
    DELETE /v1/adapters/NAME      remove it
    GET    /health                {"status": "ok"}

A request's ``model`` picks the base model (its name, or "base") or an adapter by name. With
``"stream": true`` the answer comes as Server-Sent Events (``data: {chunk}`` lines, ending
``data: [DONE]``). Every request thread hands its work to one `Scheduler`, whose worker thread
runs all requests waiting together in one batch, each row with its own adapter. Standard library
HTTP only (``http.server.ThreadingHTTPServer``); bad requests get OpenAI's error object with a
4xx status, and the server keeps serving.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

import torch

from lorakit.errors import ConfigError
from lorakit.infer import openai_api as api
from lorakit.infer.openai_api import Limits, RequestError
from lorakit.infer.endpoints import ROUTES
from lorakit.infer.scheduler import Scheduler
from lorakit.models.adapters import load_adapted
from lorakit.models.load import DEFAULT_MODEL

__all__ = ["Server", "load_server", "BASE_ALIAS"]

BASE_ALIAS = "base"
"""A request's ``model`` may always name the base model this way."""

_DROP_LIMIT = 64 << 20
"""A refused request's body up to this size is read and dropped before the answer (closing a
connection with unread data can reset it before the client reads the answer); a larger one
closes the connection."""


class Server:
    """The HTTP front of a `Scheduler`. ``start()`` serves from background threads (``url`` then
    answers); ``serve_forever()`` serves from the calling thread until Ctrl-C; ``close()`` stops
    both. ``scheduler.batches`` tells what each batch held."""

    def __init__(self, scheduler: Scheduler, *, base_id: str, base_aliases: Sequence[str] = (BASE_ALIAS,),
                 host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None,
                 max_body_bytes: int = 1 << 20, log_requests: bool = False):
        self.scheduler = scheduler
        self.tokenizer = scheduler.tokenizer
        self.base_id = base_id
        self.base_names = {base_id, *base_aliases}  # what a request's "model" may call the base model
        self.limits = limits or Limits(max_prompts=scheduler.max_batch)
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        if log_requests:
            scheduler.on_batch = self._log_batch
        self.created = int(time.time())
        self.httpd = ThreadingHTTPServer((host, port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.app = self
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{self.port}"

    def start(self) -> "Server":
        self.scheduler.start()
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="lorakit-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve until Ctrl-C or SIGTERM (from the main thread), then close as `close` does."""
        self.scheduler.start()
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
        try:
            self.httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
            self.httpd.server_close()
            self.scheduler.close()

    def close(self) -> None:
        """Stop accepting requests, finish the running batch, fail what is still queued (503)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()
        self.scheduler.close()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- models
    def model_ids(self) -> list[str]:
        return [self.base_id, *self.scheduler.adapters]

    def resolve(self, model: str) -> str | None:
        """The adapter a request's ``model`` names; None for the base model."""
        if model in self.base_names:
            return None
        if model in self.scheduler.adapters:
            return model
        raise RequestError(f"the model {model!r} does not exist; served models: {', '.join(self.model_ids())} "
                           f"(or {BASE_ALIAS!r} for the base model)", status=404, param="model",
                           code="model_not_found")

    def _log_batch(self, batch) -> None:
        names = ", ".join(self.base_id if m is None else m for m in batch.models)
        sys.stderr.write(f"batch: {batch.requests} requests, {batch.rows} rows ({names})\n")

    def card(self, model: str) -> dict:
        adapters = dict(self.scheduler.adapters)
        if model in adapters:
            return api.model_card(model, self.created, parent=self.base_id, root=adapters[model])
        return api.model_card(self.base_id, self.created)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the server as Ctrl-C does


def base_model_id(model: str) -> str:
    """The id /v1/models lists for a base model: an embedded model's name, or the last part of a path."""
    if "/" in model or os.sep in model or Path(model).exists():
        return Path(model).name or model
    return model


def load_server(model: str = DEFAULT_MODEL, adapters: Sequence[tuple[str, str | os.PathLike]] = (), *,
                host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_tokens: int = 512,
                temperature: float = 1.0, precision: str = "fp32", max_body_bytes: int = 1 << 20,
                log_requests: bool = False) -> Server:
    """Load ``model`` and the named adapter directories on it, and bind (not start) a `Server`."""
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision {precision!r}: use fp32 or bf16")
    if max_batch < 1 or max_tokens < 1:
        raise ConfigError(f"--max-batch ({max_batch}) and --max-tokens ({max_tokens}) must be at least 1")
    base_id = base_model_id(str(model))
    problems, names = [], set()
    for name, directory in adapters:
        if name in (base_id, BASE_ALIAS, str(model)):
            problems.append(f"the adapter name {name!r} is the base model's; pick another")
        if name in names:
            problems.append(f"the adapter name {name!r} is given twice")
        names.add(name)
        if not Path(directory, "adapter_config.json").is_file():
            problems.append(f"{directory} holds no adapter_config.json (pass an adapter directory)")
    if problems:
        raise ConfigError("--adapter: " + "; ".join(problems))
    loaded, tokenizer = load_adapted(list(adapters), model)
    device = next(loaded.parameters()).device
    bf16 = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)  # bf16 autocast, per batch
    scheduler = Scheduler(loaded, tokenizer, max_batch=max_batch, autocast=bf16 if precision == "bf16" else None,
                          adapters={name: str(Path(directory)) for name, directory in adapters})
    context = getattr(loaded.config, "max_position_embeddings", None)
    limits = Limits(max_tokens=max_tokens, context=context, max_prompts=max_batch, temperature=temperature)
    return Server(scheduler, base_id=base_id, base_aliases=(BASE_ALIAS, str(model)), host=host, port=port,
                  limits=limits, max_body_bytes=max_body_bytes, log_requests=log_requests)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lorakit"
    body_read = False

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def _route(self, method: str) -> None:
        app: Server = self.server.app
        self.body_read = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            matches = [(m, f, r.fullmatch(path)) for m, r, f in ROUTES if r.fullmatch(path)]
            found = [(f, match) for m, f, match in matches if m == method]
            if not found:
                allowed = sorted({m for m, _, _ in matches})
                if allowed:
                    raise RequestError(f"{method} is not allowed on {path}; use {', '.join(allowed)}", status=405,
                                       code="method_not_allowed")
                raise RequestError(f"no such endpoint: {method} {path}; endpoints: POST /v1/completions, POST "
                                   "/v1/chat/completions, GET /v1/models, POST /v1/adapters, DELETE "
                                   "/v1/adapters/NAME", status=404, code="not_found")
            func, match = found[0]
            func(app, self, *(unquote(g) for g in match.groups()))
        except RequestError as err:
            self.send_json(err.status, err.body())
        except Exception as err:  # a bug: this request gets a 500, the server goes on
            self.send_json(500, api.error_body(f"internal error: {type(err).__name__}: {err}", "server_error",
                                               code="internal_error"))

    def _length(self) -> int:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise RequestError("chunked request bodies are not supported; send Content-Length", status=411,
                               code="length_required")
        value = (self.headers.get("Content-Length") or "0").strip()
        if not value.isdigit():
            raise RequestError(f"Content-Length {value!r} is not a number of bytes", code="invalid_header")
        return int(value)

    def read_json(self) -> dict:
        length = self._length()
        limit = self.server.app.max_body_bytes
        if length > limit:
            raise RequestError(f"the request body is {length} bytes; at most {limit} (the server's "
                               "--max-body-bytes)", status=413, code="request_too_large")
        self.body_read = True
        return api.parse_json(self.rfile.read(length) if length else b"")

    def _drop_body(self) -> None:
        """Read and drop a body no endpoint read (a refused request's), so that the client gets
        the answer and the connection stays usable; one too large to read closes the connection."""
        if self.body_read:
            return
        self.body_read = True
        try:
            remaining = self._length()
        except RequestError:
            remaining = _DROP_LIMIT + 1
        if remaining > _DROP_LIMIT:
            self.close_connection = True
            return
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 16))
            if not chunk:
                break
            remaining -= len(chunk)

    def send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode()
        try:
            self._drop_body()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def start_events(self) -> None:
        self._drop_body()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection = True

    def send_event(self, obj: dict | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def log_message(self, format: str, *args) -> None:
        if self.server.app.log_requests:
            super().log_message(format, *args)
