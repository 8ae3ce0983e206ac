"""`lorakit serve`: an OpenAI-compatible HTTP server over one base model and its adapters.

Endpoints (`lorakit.infer.endpoints`; JSON in, JSON out in OpenAI's shapes, `lorakit.infer.openai_api`):

    POST   /v1/completions        prompt (string, strings or token ids) -> text_completion
    POST   /v1/chat/completions   messages, rendered with the chat template -> chat.completion
    GET    /v1/models             the base model and each adapter
    GET    /v1/models/NAME        one of them
    POST   /v1/adapters           {"name": ...}: load an adapter from --adapter-dir (off without it)
    DELETE /v1/adapters/NAME      remove it (off without --adapter-dir)
    GET    /health                {"status": "ok"}, open without the API key

``routes`` adds endpoints (`lorakit.infer.endpoints.Route`; `lorakit.playground` adds the page
and its API); a route marked public is open without the API key, as /health is.

A request's ``model`` picks the base model (its name, or "base") or an adapter by name. With
``"stream": true`` the answer comes as Server-Sent Events (``data: {chunk}`` lines, ending
``data: [DONE]``). Every request thread hands its work to one `Scheduler`, whose worker thread
runs all requests waiting together in one batch, each row with its own adapter. Standard library
HTTP only (``http.server.ThreadingHTTPServer``, `lorakit.infer.connections`); bad requests get
OpenAI's error object with a 4xx status, and the server keeps serving.

Hardening: with an ``api_key`` every endpoint but the public ones wants ``Authorization: Bearer KEY``
(401 otherwise, compared in constant time), and binding beyond loopback without one is refused
unless ``insecure_no_auth``; clients name adapters, never paths, and loading one over HTTP needs
an ``adapter_dir`` (answers never show server paths); idle connections close after
``idle_timeout`` and at most ``max_connections`` are open; SIGTERM or Ctrl-C drains (`drain`):
stop accepting, finish what is in flight for up to ``drain_timeout`` seconds, cancel the rest.
"""

from __future__ import annotations

import functools
import hmac
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Sequence
from urllib.parse import unquote, urlsplit

import torch

from lorakit.errors import ConfigError
from lorakit.infer import openai_api as api
from lorakit.infer.openai_api import Limits, RequestError
from lorakit.infer.connections import HTTPServer, check_exposure
from lorakit.infer.endpoints import ROUTES, Route
from lorakit.infer.scheduler import Scheduler
from lorakit.models.adapters import load_adapted
from lorakit.models.load import DEFAULT_MODEL
from lorakit.models.speedup import resolve_precision

__all__ = ["Server", "load_server", "BASE_ALIAS", "check_exposure"]

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
                 max_body_bytes: int = 1 << 20, log_requests: bool = False, api_key: str | None = None,
                 insecure_no_auth: bool = False, adapter_dir: str | os.PathLike | None = None,
                 idle_timeout: float = 30.0, max_connections: int = 64, drain_timeout: float = 30.0,
                 routes: Sequence[Route] = ()):
        check_exposure(host, api_key, insecure_no_auth)
        self.scheduler = scheduler
        self.routes = [*ROUTES, *routes]  # the endpoints (`lorakit.infer.endpoints`), then the extra ones
        self.tokenizer = scheduler.tokenizer
        self.base_id = base_id
        self.base_names = {base_id, *base_aliases}  # what a request's "model" may call the base model
        self.limits = limits or Limits(max_prompts=scheduler.max_batch)
        self.max_body_bytes = max_body_bytes
        self.log_requests = log_requests
        if log_requests:
            scheduler.on_batch = self._log_batch
        self.api_key = api_key.encode() if api_key else None
        self.adapter_dir = Path(adapter_dir).resolve() if adapter_dir is not None else None
        self.drain_timeout = drain_timeout
        self.draining = False
        self.created = int(time.time())
        self.httpd = HTTPServer((host, port), _Handler, max_connections=max_connections, idle_timeout=idle_timeout)
        self.httpd.app = self
        self._thread: threading.Thread | None = None
        self._signals = 0

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

    def serve_forever(self) -> bool:
        """Serve until SIGTERM or Ctrl-C (from the main thread), then `drain`; True when it
        stopped cleanly. A second signal during the drain cancels what is left at once."""
        self.scheduler.start()
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        try:
            self.httpd.serve_forever()
            return self.drain(self.drain_timeout)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self._signals += 1
        if self._signals == 1:  # stop accepting; serve_forever returns and drains
            threading.Thread(target=self.httpd.shutdown, name="lorakit-serve-stop", daemon=True).start()
        else:
            self.scheduler.cancel()

    def drain(self, timeout: float) -> bool:
        """Stop gracefully: stop accepting connections, close the idle ones, let the queued and
        running requests finish for up to ``timeout`` seconds, cancel the rest (503), and wait
        for their answers to be sent. True when the worker stopped (it does unless one forward
        pass outlasts the grace of 30 s)."""
        self._stop_accepting()
        self.httpd.close_idle()
        stopped = self.scheduler.drain(timeout)
        self.httpd.wait_quiet(10.0)  # the handlers write the last answers
        self.httpd.close_idle()
        return stopped

    def close(self) -> None:
        """Stop accepting requests, finish the running batch, fail what is still queued (503)."""
        self._stop_accepting()
        self.scheduler.close()
        self.httpd.close_idle()

    def _stop_accepting(self) -> None:
        """Stop the accept loop (the background thread's, if any) and close the listening socket;
        answers from here on ask clients to close their connections."""
        self.draining = True
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
            self._thread = None
        self.httpd.server_close()

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
        """OpenAI's model object; an adapter's ``root`` is its own name (never a server path)."""
        if model in self.scheduler.adapters:
            return api.model_card(model, self.created, parent=self.base_id, root=model)
        return api.model_card(self.base_id, self.created)

    def authorized(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header carries the API key (always, without one)."""
        if self.api_key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key)


def base_model_id(model: str) -> str:
    """The id /v1/models lists for a base model: an embedded model's name, or the last part of a path."""
    if "/" in model or os.sep in model or Path(model).exists():
        return Path(model).name or model
    return model


def load_server(model: str = DEFAULT_MODEL, adapters: Sequence[tuple[str, str | os.PathLike]] = (), *,
                host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_tokens: int = 512,
                temperature: float = 1.0, precision: str = "auto", max_body_bytes: int = 1 << 20,
                log_requests: bool = False, api_key: str | None = None, insecure_no_auth: bool = False,
                adapter_dir: str | os.PathLike | None = None, idle_timeout: float = 30.0, max_connections: int = 64,
                drain_timeout: float = 30.0, routes: Sequence[Route] = ()) -> Server:
    """Load ``model`` and the named adapter directories on it, and bind (not start) a `Server`
    (the hardening options are `Server`'s, see the module docstring; ``routes``: endpoints served
    beside OpenAI's, e.g. `lorakit.playground`'s)."""
    check_exposure(host, api_key, insecure_no_auth)
    if adapter_dir is not None and not Path(adapter_dir).is_dir():
        raise ConfigError(f"--adapter-dir {adapter_dir}: no such directory; give the directory whose adapters "
                          "clients may load by name (e.g. runs)")
    if idle_timeout <= 0 or max_connections < 1 or drain_timeout < 0:
        raise ConfigError(f"--idle-timeout ({idle_timeout}) must be above 0, --max-connections ({max_connections}) "
                          f"at least 1 and --drain-timeout ({drain_timeout}) at least 0")
    if precision not in ("fp32", "bf16", "auto"):
        raise ConfigError(f"--precision {precision!r}: use auto, fp32 or bf16")
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
    precision = resolve_precision(precision, device)  # auto: bf16 where the machine multiplies bf16 natively
    bf16 = functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)  # bf16 autocast, per batch
    scheduler = Scheduler(loaded, tokenizer, max_batch=max_batch, autocast=bf16 if precision == "bf16" else None,
                          adapters={name: str(Path(directory)) for name, directory in adapters})
    context = getattr(loaded.config, "max_position_embeddings", None)
    limits = Limits(max_tokens=max_tokens, context=context, max_prompts=max_batch, temperature=temperature)
    return Server(scheduler, base_id=base_id, base_aliases=(BASE_ALIAS, str(model)), host=host, port=port,
                  limits=limits, max_body_bytes=max_body_bytes, log_requests=log_requests, api_key=api_key,
                  insecure_no_auth=insecure_no_auth, adapter_dir=adapter_dir, idle_timeout=idle_timeout,
                  max_connections=max_connections, drain_timeout=drain_timeout, routes=routes)


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

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # the socket's: a silent connection is closed
        super().setup()

    def _route(self, method: str) -> None:
        app: Server = self.server.app
        self.server.mark(self.request, busy=True)
        try:
            self._answer(app, method)
        finally:
            if app.draining:
                self.close_connection = True
            self.server.mark(self.request, busy=False)

    def _answer(self, app: "Server", method: str) -> None:
        self.body_read = False
        path = urlsplit(self.path).path.rstrip("/") or "/"
        try:
            matches = [(route, match) for route in app.routes if (match := route.pattern.fullmatch(path))]
            public = any(route.public for route, _ in matches)  # /health, and what extra routes open
            if not public and not app.authorized(self.headers.get("Authorization")):
                raise RequestError("missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                   "server's --api-key", status=401, code="invalid_api_key")
            found = [(route.endpoint, match) for route, match in matches if route.method == method]
            if not found:
                allowed = sorted({route.method for route, _ in matches})
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
        except Exception as err:  # a bug: this request gets a 500 (details in the log only), the server goes on
            sys.stderr.write(f"internal error on {method} {path}: {type(err).__name__}: {err}\n")
            self.send_json(500, api.error_body(f"internal error ({type(err).__name__}); the server's log has the "
                                               "details", "server_error", code="internal_error"))

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
        self._send(status, "application/json", json.dumps(obj).encode())

    def send_bytes(self, status: int, content_type: str, data: bytes) -> None:
        """Send ``data`` as it is (a page, a script, an image): to be read as ``content_type`` only
        (``nosniff``), and checked again before each use (``no-cache``)."""
        self._send(status, content_type, data, (("Cache-Control", "no-cache"), ("X-Content-Type-Options", "nosniff")))

    def _send(self, status: int, content_type: str, data: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        try:
            self._drop_body()
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            if self.close_connection or self.server.app.draining:
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
