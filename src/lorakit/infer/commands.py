"""`lorakit merge`, `lorakit compare`, `lorakit generate` and `lorakit serve`: parse, call the
library, print."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from lorakit.generation.engine import Sampling
from lorakit.infer.compare import compare_adapters, parse_adapter_specs
from lorakit.infer.merge import merge_adapter
from lorakit.infer.prompting import RESERVED, assign_prompts, complete_prompts, parse_adapters
from lorakit.infer.server import load_server
from lorakit.models.adapters import load_adapted
from lorakit.models.load import DEFAULT_MODEL

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge an adapter into its base model and save a full model directory",
                              description="Merge an adapter into its base model and write a model directory "
                                          "that plain transformers loads (safetensors, config, tokenizer), "
                                          "atomically. bf16 and fp16 merges report how much of the update "
                                          "survives rounding.")
    p.add_argument("--adapter", required=True, help="an adapter directory")
    p.add_argument("--out", required=True, help="the model directory to write (must be new or empty)")
    p.add_argument("--model", help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="the saved weights' dtype (default: the base model's); bf16 and fp16 report "
                        "how much of the update survives rounding")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--max-shard-size", help="largest safetensors file, e.g. 2GB (default: transformers')")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_merge)

    p = subparsers.add_parser("compare", help="score several adapters (and the base model) on the same held-out data",
                              description="Score adapters side by side on one held-out set; the base model "
                                          "is loaded once and the adapters are swapped on it.")
    p.add_argument("--adapter", required=True, action="append", metavar="NAME=DIR",
                   help="an adapter to compare, named (repeat for each)")
    p.add_argument("--include-base", action="store_true", help="score the base model without adapters too")
    p.add_argument("--model", help="the base model (default: the adapters' base_model_name_or_path)")
    p.add_argument("--data", default="task-api", help="task-api (its held-out split), or a data file or dataset as lorakit train --data takes")
    p.add_argument("--examples", type=int, default=200, help="how many examples to score")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--show", type=int, default=3, help="how many disagreements to print")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_compare)

    p = subparsers.add_parser("generate", help="complete prompts with a base model and adapters (streaming, sampling)",
                              description="Complete prompts as one-turn chats. The base model is loaded once and "
                                          "the adapters onto it; all prompts run in one batch, each with its own "
                                          "adapter. One completion streams as it is produced.")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR",
                   help="an adapter to load, named (repeatable); a lone bare DIR is named 'default'")
    p.add_argument("--model", help="the base model (default: the adapters' base_model_name_or_path, else "
                                    f"{DEFAULT_MODEL})")
    p.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                   help="a user message, completed with the adapter (with each adapter when there are several, "
                        "with the base model when there is none); repeatable")
    p.add_argument("--prompt-for", dest="prompts", action="append", nargs=2, metavar=("NAME", "TEXT"),
                   help="a user message completed with adapter NAME ('base': the base model); repeatable")
    p.add_argument("--system", help="a system message, e.g. the one the adapter was trained with")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default); above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep this much probability (1 = all)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, help="the sampling seed: the same seed gives the same completion")
    p.add_argument("--no-stream", action="store_true", help="print a lone completion when it is done, not as it grows")
    p.add_argument("--json", action="store_true", help="print one JSON object with every completion")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("serve", help="serve a base model and its adapters over an OpenAI-compatible HTTP API",
                              description="Serve /v1/completions, /v1/chat/completions and /v1/models (OpenAI's "
                                          "API; a request's model picks the base model or an adapter) until "
                                          "Ctrl-C. Concurrent requests run together in one batch, each with its "
                                          "own adapter. See docs/SERVING.md.")
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
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs the forward passes under bf16 autocast")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="the largest request body accepted")
    p.add_argument("--api-key", metavar="KEY",
                   help="clients must send 'Authorization: Bearer KEY' (every endpoint but /health); prefer "
                        "$LORAKIT_API_KEY, which other users cannot read in the process list")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow a --host beyond this machine without --api-key (anyone who reaches it may use it)")
    p.add_argument("--adapter-dir", metavar="DIR",
                   help="let clients load the adapters in DIR by name with POST /v1/adapters (off when unset)")
    p.add_argument("--idle-timeout", type=float, default=30.0,
                   help="close a connection that sends nothing for this many seconds")
    p.add_argument("--max-connections", type=int, default=64,
                   help="the most open connections; at the limit the oldest idle one is closed, and when all "
                        "are busy a new one gets 503")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, let requests in flight finish for this many seconds, then cancel "
                        "them (a second signal cancels at once)")
    p.add_argument("--quiet", action="store_true", help="do not log each batch and request")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    server = load_server(args.model, parse_adapter_specs(args.adapter), host=args.host, port=args.port,
                         max_batch=args.max_batch, max_tokens=args.max_tokens, temperature=args.temperature,
                         precision=args.precision, max_body_bytes=args.max_body_bytes,
                         log_requests=not args.quiet, api_key=args.api_key, insecure_no_auth=args.insecure_no_auth,
                         adapter_dir=args.adapter_dir, idle_timeout=args.idle_timeout,
                         max_connections=args.max_connections, drain_timeout=args.drain_timeout)
    models = ", ".join(server.model_ids())
    print(f"serving {models} on {server.url}/v1 (Ctrl-C stops)", flush=True)
    if server.serve_forever():
        print("stopped", flush=True)
        return 0
    print("stopped: a forward pass outlasted the drain; exiting without waiting for it", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)  # the worker thread is still inside torch: an ordinary exit would abort in its teardown


def _merge(args) -> int:
    report = merge_adapter(args.adapter, args.out, model=args.model, dtype=args.dtype, force=args.force,
                           max_shard_size=args.max_shard_size)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0


def _compare(args) -> int:
    result = compare_adapters(parse_adapter_specs(args.adapter), include_base=args.include_base, model=args.model,
                              data=args.data, examples=args.examples, max_new_tokens=args.max_new_tokens)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary(show=args.show))
    return 0


def _generate(args) -> int:
    pairs = parse_adapters(args.adapter)
    prompts = assign_prompts([p if isinstance(p, str) else tuple(p) for p in args.prompts or []],
                             [name for name, _ in pairs])
    sampling = Sampling(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                        max_new_tokens=args.max_new_tokens)
    model, tokenizer = load_adapted(pairs, model=args.model, reserved=RESERVED)
    stream = len(prompts) == 1 and not (args.no_stream or args.json)
    on_text = (lambda i, piece: print(piece, end="", flush=True)) if stream else None
    completions = complete_prompts(model, tokenizer, prompts, system=args.system, sampling=sampling, on_text=on_text)
    if args.json:
        print(json.dumps({"sampling": dataclasses.asdict(sampling),
                          "completions": [c.as_dict() for c in completions]}, indent=2))
    elif stream:
        print()
    elif len(completions) == 1:
        print(completions[0].text.strip())
    else:
        for i, c in enumerate(completions, 1):
            print(f"[{i}] {c.adapter}: {c.prompt}")
            print(c.text.strip(), end="\n\n" if i < len(completions) else "\n")
    return 0
