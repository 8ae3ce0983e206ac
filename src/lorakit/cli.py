"""`lorakit <command>`: parse, call the library, print.

Each command group lives beside the library code it calls, in a ``commands`` module with a
``register(subparsers)`` function that adds its sub-commands; each sub-command sets
``func(args) -> int``. This file only wires them up (every option's help states its default,
and $LORAKIT_<OPTION> can set it) and turns errors into exit codes:
2 for bad input (a ``LorakitError``), 1 for a failure while running (``TrainingError`` or any
other exception), 130 when interrupted (``TrainingInterrupted``, after a checkpoint is saved).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Mapping

from lorakit import __version__
from lorakit.errors import LorakitError, TrainingError, TrainingInterrupted

# Modules that contribute sub-commands, in the order `lorakit --help` lists them.
COMMAND_MODULES = (
    "lorakit.train.commands",
    "lorakit.infer.commands",
    "lorakit.playground.commands",
    "lorakit.plan.commands",
    "lorakit.export.commands",
)

# `LORAKIT_MAX_STEPS=3 lorakit ...` is `lorakit ... --max-steps 3` for every command that takes
# --max-steps and is not given it: any option that takes one value, named LORAKIT_ + the flag's
# name in capitals with "_" for "-". A flag on the command line wins. E.g. LORAKIT_MODEL=DIR (a
# tiny model directory) and LORAKIT_MAX_STEPS make every documented command run in seconds.
ENV_PREFIX = "LORAKIT_"

# What a bare `lorakit` prints after the list of commands.
FIRST_STEPS = """\
first steps:
  lorakit train                 fine-tune the embedded SmolLM2-135M on the built-in task-api data
  lorakit diagnose runs/<run>   read that run's loss curves: healthy, or what to change
  lorakit runs                  every run so far: how far, how well, how it ended; --compare A B

`lorakit COMMAND --help` shows a command's options with their defaults."""

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it.

    An option that is off unless given (``store_true``) says so; one with no default says
    nothing more (it is either required or optional with no value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return (text + " " if text else "") + "(default: off)"
        if action.default is None or isinstance(action, argparse._HelpAction):
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


class RawDefaultsHelpFormatter(DefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`DefaultsHelpFormatter` for commands whose description is a preformatted docstring."""


def build_parser(environ: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The `lorakit` parser; ``environ`` (default: the process environment) supplies
    $LORAKIT_MODEL."""
    environ = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA fine-tuning for PyTorch, file-compatible with Hugging Face PEFT.",
        epilog=FIRST_STEPS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for sub in subparsers.choices.values():
        for action in sub._actions:
            _default_from_environment(action, environ)
            if action.help is None and action.option_strings and action.default is not None:
                action.help = "(default: %(default)s)"  # argparse prints nothing for help=None
        raw = issubclass(sub.formatter_class, argparse.RawDescriptionHelpFormatter)
        sub.formatter_class = RawDefaultsHelpFormatter if raw else DefaultsHelpFormatter
    return parser


def env_name(action: argparse.Action) -> str | None:
    """LORAKIT_MAX_STEPS for --max-steps: the variable that sets an option taking one value."""
    long = [o for o in action.option_strings if o.startswith("--")]
    if not long or action.nargs not in (None, "?") or not isinstance(action, argparse._StoreAction):
        return None
    return ENV_PREFIX + long[0][2:].upper().replace("-", "_")


def _default_from_environment(action: argparse.Action, environ: Mapping[str, str]) -> None:
    """Make $LORAKIT_<OPTION> the option's default (argparse converts a string default with the
    option's type, as if it were given), and say so in its help."""
    name = env_name(action)
    if name is None or not environ.get(name):
        return
    action.default = environ[name]
    stated = re.sub(r"\s*\(default: [^)]*\)", "", action.help or "")
    secret = name.endswith("_KEY")  # an API key is not printed by --help
    shown = "set" if secret else environ[name].replace("%", "%%")  # argparse %-formats help text
    action.help = f"{stated} (default: ${name}, {shown})".strip()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given (a command that starts workers passes it on)
    if not getattr(args, "func", None):
        # A bare `lorakit`: the commands and the first steps, not an error.
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as err:
        _say(f"interrupted{_rank()}: {err}")
        return EXIT_INTERRUPTED
    except TrainingError as err:
        if args.debug:
            raise
        _say(f"error{_rank()}: {err}")
        return EXIT_FAILURE
    except LorakitError as err:
        if args.debug:
            raise
        _say(f"error{_rank()}: {err}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # a failure while running: one line unless --debug
        if args.debug:
            raise
        _say(f"error{_rank()}: {type(err).__name__}: {err}")
        return EXIT_FAILURE


def _say(line: str) -> None:
    """One line on stderr in one write (the lines of several processes sharing it stay whole)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _rank() -> str:
    """" (rank 1 of 2)" in a process that torchrun started as one of several, else "": which
    process an error line comes from."""
    size, rank = os.environ.get("WORLD_SIZE", ""), os.environ.get("RANK", "")
    return f" (rank {rank} of {size})" if size.isdigit() and int(size) > 1 and rank.isdigit() else ""


if __name__ == "__main__":
    sys.exit(main())
