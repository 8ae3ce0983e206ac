"""The playground's HTTP side: the page, its files, and the endpoints it reads (docs/PLAYGROUND.md).

    GET  /                                  the page (static/index.html), open without the API key
    GET  /static/NAME                       one file of static/ by its exact name, open without the key
    GET  /v1/playground/info                the base model, the served models, the runs directory
    GET  /v1/playground/runs                every run, as `lorakit runs --json` gives it, + loaded, has_adapter
    GET  /v1/playground/runs/NAME           one run: config, report, loss curves, scores, data summary
    GET  /v1/playground/runs/NAME/loss.png  its loss plot
    GET  /v1/playground/examples            ?run=NAME&limit=N: held-out examples as chats
    POST /v1/playground/score               {"run", "models", "limit", "max_tokens"}: each model scored

`Playground(runs_dir).routes()` are the `lorakit.infer.endpoints.Route` list that
``load_server(..., routes=...)`` adds to the server (`load_playground`); a run's adapter is
added with the server's own ``POST /v1/adapters {"name": RUN}``, which needs ``--adapter-dir``
to be the runs directory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import parse_qs, urlsplit

from lorakit.evaluation import line_breaks_for
from lorakit.infer import openai_api as api
from lorakit.infer.endpoints import Route
from lorakit.infer.openai_api import RequestError
from lorakit.infer.server import load_server
from lorakit.models.load import DEFAULT_MODEL
from lorakit.playground.examples import MAX_EXAMPLES, heldout_examples
from lorakit.playground.runs import find_run, run_detail, run_rows
from lorakit.playground.scoring import score_models

if TYPE_CHECKING:
    from lorakit.infer.server import Server, _Handler

__all__ = ["Playground", "load_playground", "STATIC_DIR", "CONTENT_TYPES"]

STATIC_DIR = Path(__file__).parent / "static"
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain; charset=utf-8",
                 ".png": "image/png"}
"""The files static/ serves, by suffix; any other name is a 404."""
DEFAULT_LIMIT = 20
MAX_MODELS = 16


class Playground:
    """The page and its endpoints over the runs in ``runs_dir`` (kept as given, shown as given)."""

    def __init__(self, runs_dir: str | os.PathLike = "runs", static_dir: str | os.PathLike = STATIC_DIR):
        self.runs_dir = str(runs_dir)
        self.static_dir = Path(static_dir)
        self._line_breaks: dict[str, tuple[int, ...] | None] = {}  # scorer -> its stop tokens (a second to compute)

    def routes(self) -> list[Route]:
        return [
            Route("GET", re.compile(r"/"), self._page, public=True),
            Route("GET", re.compile(r"/static/([^/]+)"), self._static, public=True),
            Route("GET", re.compile(r"/v1/playground/info"), self._info),
            Route("GET", re.compile(r"/v1/playground/runs"), self._runs),
            Route("GET", re.compile(r"/v1/playground/runs/([^/]+)"), self._run),
            Route("GET", re.compile(r"/v1/playground/runs/([^/]+)/loss\.png"), self._loss_png),
            Route("GET", re.compile(r"/v1/playground/examples"), self._examples),
            Route("POST", re.compile(r"/v1/playground/score"), self._score),
        ]

    def can_add_adapters(self, app: "Server") -> bool:
        """Whether ``POST /v1/adapters {"name": RUN}`` loads a run's adapter: --adapter-dir is the runs directory."""
        return app.adapter_dir is not None and app.adapter_dir == Path(self.runs_dir).resolve()

    # -- the page
    def _page(self, app: "Server", h: "_Handler") -> None:
        self._static(app, h, "index.html")

    def _static(self, app: "Server", h: "_Handler", name: str) -> None:
        """A file of static/ by its exact name: no path, no other directory, only the listed types."""
        try:
            names = {p.name for p in self.static_dir.iterdir() if p.is_file() and not p.is_symlink()}
        except OSError:
            names = set()
        suffix = Path(name).suffix.lower() if name in names else None
        if suffix not in CONTENT_TYPES:
            raise RequestError(f"no file {name!r} in the playground's static files", status=404, code="not_found")
        h.send_bytes(200, CONTENT_TYPES[suffix], (self.static_dir / name).read_bytes())

    # -- runs
    def _info(self, app: "Server", h: "_Handler") -> None:
        h.send_json(200, {"base": app.base_id, "models": app.model_ids(), "runs_dir": self.runs_dir,
                          "can_add_adapters": self.can_add_adapters(app), "auth": app.api_key is not None})

    def _runs(self, app: "Server", h: "_Handler") -> None:
        h.send_json(200, {"runs": run_rows(self.runs_dir, set(app.scheduler.adapters))})

    def _run(self, app: "Server", h: "_Handler", name: str) -> None:
        h.send_json(200, run_detail(self.runs_dir, name, set(app.scheduler.adapters)))

    def _loss_png(self, app: "Server", h: "_Handler", name: str) -> None:
        path = find_run(self.runs_dir, name) / "loss.png"
        if not path.is_file():
            raise RequestError(f"the run {name!r} has no loss.png (it is written as the run logs)", status=404,
                               code="not_found")
        h.send_bytes(200, "image/png", path.read_bytes())

    # -- examples and scores
    def _examples(self, app: "Server", h: "_Handler") -> None:
        query = parse_qs(urlsplit(h.path).query)
        run = query.get("run", [None])[-1] or None
        limit = _limit(query.get("limit", [str(DEFAULT_LIMIT)])[-1])
        held = heldout_examples(None if run is None else find_run(self.runs_dir, run), limit)
        h.send_json(200, {"run": run, "data": held.data, "scorer": held.scorer,
                          "examples": [e.as_dict() for e in held.examples]})

    def _score(self, app: "Server", h: "_Handler") -> None:
        body = h.read_json()
        run = api.get_field(body, "run", (str,), None)
        models = api.get_field(body, "models", (list,))
        if not models or len(models) > MAX_MODELS or not all(isinstance(m, str) and m for m in models):
            raise RequestError(f"'models' must be an array of 1 to {MAX_MODELS} model names (GET /v1/models)",
                               param="models", code="invalid_value")
        limit = api.get_field(body, "limit", (int,), DEFAULT_LIMIT)
        if not 1 <= limit <= MAX_EXAMPLES:
            raise RequestError(f"'limit' must be from 1 to {MAX_EXAMPLES}, got {str(limit)[:40]}", param="limit",
                               code="invalid_value")
        max_tokens = api.get_field(body, "max_tokens", (int,), min(64, app.limits.max_tokens))
        held = heldout_examples(None if run is None else find_run(self.runs_dir, run), limit)
        if held.scorer not in self._line_breaks:
            self._line_breaks[held.scorer] = line_breaks_for(held.scorer, app.tokenizer)
        result = score_models(app, held, list(dict.fromkeys(models)), max_tokens=max_tokens,
                              line_breaks=self._line_breaks[held.scorer] or ())
        h.send_json(200, result)


def _limit(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_EXAMPLES:
        raise RequestError(f"limit must be a number from 1 to {MAX_EXAMPLES}, got {text[:40]!r}", param="limit",
                           code="invalid_value")
    return int(text)


def load_playground(model: str = DEFAULT_MODEL, adapters: Sequence[tuple[str, str | os.PathLike]] = (), *,
                    runs_dir: str | os.PathLike = "runs", **options) -> "Server":
    """`lorakit.infer.server.load_server` (``options`` are its keyword arguments) with the
    playground's page and endpoints over the runs in ``runs_dir``."""
    return load_server(model, adapters, routes=Playground(runs_dir).routes(), **options)
