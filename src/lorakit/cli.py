"""`lorakit <command>`: parse, call the library, print.

Each command group lives beside the library code it calls, in a ``commands`` module with a
``register(subparsers)`` function that adds its sub-commands; each sub-command sets
``func(args) -> int``. This file only wires them up and turns errors into exit codes:
2 for bad input (a ``LorakitError``), 1 for a failure while running (``TrainingError`` or any
other exception), 130 when interrupted (``TrainingInterrupted``, after a checkpoint is saved).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit.errors import LorakitError, TrainingError, TrainingInterrupted

# Modules that contribute sub-commands, in the order `lorakit --help` lists them.
COMMAND_MODULES = (
    "lorakit.train.commands",
    "lorakit.infer.commands",
    "lorakit.plan.commands",
)

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch, file-compatible with Hugging Face PEFT.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except TrainingError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except LorakitError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a failure while running: one line unless --debug
        if args.debug:
            raise
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
