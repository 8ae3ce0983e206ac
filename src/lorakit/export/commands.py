"""`lorakit export`: parse, call the library, print."""

from __future__ import annotations

import json

from lorakit.export.exporting import FORMATS, export_adapter
from lorakit.export.gguf_model import OUTTYPES

__all__ = ["register"]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write an adapter for llama.cpp, Ollama or vLLM (GGUF adapter, merged GGUF, Modelfile)",
        description="Write an adapter (or the model merged with it) where people run models: gguf-adapter (a LoRA "
                    "GGUF for llama.cpp's --lora), gguf (the merged model, tokenizer and chat template inside), "
                    "ollama (a GGUF and a Modelfile), vllm (the adapter checked against vLLM's LoRA loader). "
                    "Writes a new directory atomically and prints the command that runs it.")
    p.add_argument("--adapter", required=True, help="an adapter directory (a run's adapter/)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", required=True, help="the directory to write (must be new or empty)")
    p.add_argument("--model", help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--outtype", choices=OUTTYPES, default="f16",
                   help="the tensor type of a merged GGUF (gguf, ollama)")
    p.add_argument("--name", help="the model's name for Ollama and vLLM (default: the run's directory name)")
    p.add_argument("--system", help="Ollama's system prompt (default: the one the adapter was trained with, for "
                                    "task-api runs)")
    p.add_argument("--lora", action="store_true",
                   help="ollama: the base and the adapter as two GGUF files (FROM + ADAPTER) instead of one "
                        "merged file")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_export)


def _export(args) -> int:
    report = export_adapter(args.adapter, args.out, args.format, model=args.model, outtype=args.outtype,
                            name=args.name, system=args.system, lora=args.lora, force=args.force)
    print(json.dumps(report.as_dict(), indent=2) if args.json else report.summary())
    return 0
