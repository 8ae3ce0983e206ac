"""`lorakit merge`, `lorakit compare` and `lorakit generate`: parse, call the library, print
(`lorakit serve` is `lorakit.playground.commands`', which adds the playground's page to it)."""

from __future__ import annotations

import dataclasses
import json

from lorakit.generation.engine import Sampling
from lorakit.infer.compare import compare_adapters, parse_adapter_specs
from lorakit.infer.merge import merge_adapter
from lorakit.infer.prompting import RESERVED, assign_prompts, complete_prompts, parse_adapters
from lorakit.models.adapters import load_adapted
from lorakit.models.load import DEFAULT_MODEL
from lorakit.models.speedup import autocast_for, resolve_precision

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
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16: frozen weights and the KV cache in bf16 (about twice the tokens/s on a CPU with "
                        "native bf16; a greedy answer can change where two tokens nearly tie); auto: bf16 where the "
                        "machine multiplies bf16 natively, else fp32")
    p.add_argument("--no-stream", action="store_true", help="print a lone completion when it is done, not as it grows")
    p.add_argument("--json", action="store_true", help="print one JSON object with every completion")
    p.set_defaults(func=_generate)


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
    device = next(model.parameters()).device
    precision = resolve_precision(args.precision, device)
    completions = complete_prompts(model, tokenizer, prompts, system=args.system, sampling=sampling, on_text=on_text,
                                   autocast=autocast_for(precision, device) if precision == "bf16" else None)
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
