"""`lorakit serve` and `lorakit playground`: parse, call the library, print.

Both run the same server (`lorakit.playground.load_playground`): OpenAI's API, the playground's
page and its endpoints over the runs in --runs-dir. `lorakit playground` lets the page add any
run's adapter by name (--adapter-dir is the runs directory unless given) and opens the page in
the browser.
"""

from __future__ import annotations

import os
import sys
import webbrowser
from pathlib import Path

from lorakit.infer.compare import parse_adapter_specs
from lorakit.infer.server import Server
from lorakit.models.load import DEFAULT_MODEL
from lorakit.playground.routes import load_playground

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
                              description="Serve /v1/completions, /v1/chat/completions and /v1/models (OpenAI's "
                                          "API; a request's model picks the base model or an adapter) until "
                                          "Ctrl-C. Concurrent requests run together in one batch, each with its "
                                          "own adapter. The playground's page is at / (lorakit playground). See "
                                          "docs/SERVING.md.")
    _server_options(p, adapter_dir="let clients load the adapters in DIR by name with POST /v1/adapters (off when "
                                   "unset)")
    p.set_defaults(func=_serve)

    p = subparsers.add_parser("playground", help="try, compare and score adapters side by side in the browser",
                              description="Serve the playground's page and OpenAI's API (as lorakit serve does) "
                                          "until Ctrl-C, and open the page in the browser: chat with the base "
                                          "model and adapters side by side, read the runs under --runs-dir, "
                                          "score them on their held-out examples. See docs/PLAYGROUND.md.")
    _server_options(p, adapter_dir="the directory whose adapters the page may add by name (default: --runs-dir, "
                                   "when it exists)")
    p.add_argument("--no-browser", action="store_true", help="print the page's address without opening it")
    p.set_defaults(func=_playground)


def _server_options(p, adapter_dir: str) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the base model (default: {DEFAULT_MODEL})")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="an adapter to serve under NAME (repeatable); with --adapter-dir, clients add more by name")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (0.0.0.0: every interface; beyond loopback it needs --api-key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="the most rows (prompts) one batch runs together")
    p.add_argument("--max-tokens", type=int, default=512, help="the most new tokens a request may ask for")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the temperature of requests that give none (OpenAI's default, 1; 0 = greedy)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16: frozen weights and the KV cache in bf16, the forward under bf16 autocast; "
                        "auto: bf16 where the machine multiplies bf16 natively, else fp32")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body accepted")
    p.add_argument("--api-key", metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' (every endpoint but /health and the "
                        "playground's page); prefer $LORAKIT_API_KEY, which other users cannot read in the "
                        "process list")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a --host beyond this machine without --api-key (anyone who reaches it may use it)")
    p.add_argument("--adapter-dir", metavar="DIR", help=adapter_dir)
    p.add_argument("--runs-dir", default="runs", metavar="DIR",
                   help="the runs the playground's page shows (lorakit train's --output-dir)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="close a connection that sends nothing for this many seconds")
    p.add_argument("--max-connections", type=int, default=64,
                   help="the most open connections; at the limit the oldest idle one is closed, and when all "
                        "are busy a new one gets 503")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, let requests in flight finish for this many seconds, then cancel "
                        "them (a second signal cancels at once)")
    p.add_argument("--quiet", action="store_true", help="do not log each batch and request")


def _load(args, adapter_dir) -> Server:
    return load_playground(args.model, parse_adapter_specs(args.adapter), runs_dir=args.runs_dir, host=args.host,
                           port=args.port, max_batch=args.max_batch, max_tokens=args.max_tokens,
                           temperature=args.temperature, precision=args.precision,
                           max_body_bytes=args.max_body_bytes, log_requests=not args.quiet, api_key=args.api_key,
                           insecure_no_auth=args.insecure_no_auth, adapter_dir=adapter_dir,
                           idle_timeout=args.idle_timeout, max_connections=args.max_connections,
                           drain_timeout=args.drain_timeout)


def _serve(args) -> int:
    server = _load(args, args.adapter_dir)
    print(f"serving {', '.join(server.model_ids())} on {server.url}/v1 (Ctrl-C stops)", flush=True)
    return _serve_until_stopped(server)


def _playground(args) -> int:
    adapter_dir = args.adapter_dir
    if adapter_dir is None and Path(args.runs_dir).is_dir():
        adapter_dir = args.runs_dir
    server = _load(args, adapter_dir)
    page = server.url + "/"
    print(f"playground: {page} (serving {', '.join(server.model_ids())}; Ctrl-C stops)", flush=True)
    if adapter_dir is None:
        print(f"no {args.runs_dir}/ here: the page cannot add runs' adapters (train one, or pass --runs-dir)",
              flush=True)
    if args.api_key:
        print("the page asks for the API key (--api-key) once per browser tab", flush=True)
    if not args.no_browser:
        try:
            webbrowser.open(page)
        except webbrowser.Error:  # no browser here: the address above is enough
            pass
    return _serve_until_stopped(server)


def _serve_until_stopped(server: Server) -> int:
    if server.serve_forever():
        print("stopped", flush=True)
        return 0
    print("stopped: a forward pass outlasted the drain; exiting without waiting for it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # the worker thread is still inside torch: an ordinary exit would abort in its teardown
