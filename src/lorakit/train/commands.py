"""`lorakit train`, `lorakit eval` and `lorakit runs`: parse, call the library, print."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from lorakit.errors import CheckpointError, ConfigError
from lorakit.evaluation import evaluate_adapter
from lorakit.train import distributed
from lorakit.train.compare import compare_runs, default_plot_path, find_run, format_comparison, plot_comparison
from lorakit.train.config import AdapterSettings, TrainConfig, field_docs, load_train_config, setting_names
from lorakit.train.loop import train
from lorakit.train.runs import DEFAULT_SORT, SORT_COLUMNS, format_table, list_runs, sort_runs
from lorakit.train.setup import restart_command

__all__ = ["register"]

# Flags with a shorter name than their TrainConfig field.
ALIASES = {"learning_rate": "--lr", "data_format": "--format", "data_fields": "--field"}
# Second names: torchrun's own parser reads "--r" as an abbreviation of its options (--rdzv-*,
# --role, ...) even after "-m lorakit train", so under torchrun the rank is given as --rank.
SECOND_NAMES = {"r": ("--rank",)}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a LoRA adapter (defaults: the embedded model on task-api)",
                              description="Fine-tune a LoRA adapter. Flags override --config; "
                                          "the resolved configuration is saved in the run directory.")
    p.add_argument("--config", help="a YAML file of training options (e.g. a run's config.yaml)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its newest valid checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, default=1,
                   help="train on N processes of this machine: starts torchrun for you (one per GPU; on a CPU "
                        "each gets its share of the cores); --strategy says how they share the model")
    _add_config_flags(p)
    p.set_defaults(func=_train)

    p = subparsers.add_parser("eval", help="score an adapter on held-out data")
    p.add_argument("--adapter", required=True, help="an adapter directory")
    p.add_argument("--model", help="the base model (default: the adapter's base_model_name_or_path)")
    p.add_argument("--data", default="task-api", help="task-api (its held-out split), or a data file or dataset as lorakit train --data takes")
    p.add_argument("--examples", type=int, default=200, help="how many examples to score")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("runs", help="list the training runs and compare two of them",
                              description="A table of the runs under --dir: what was trained, how far, how well, "
                                          "and how each ended (finished, running, interrupted, killed, failed). "
                                          "--compare A B shows two side by side and plots their loss curves. "
                                          "See docs/RUNS.md.")
    p.add_argument("--dir", default="runs", help="the directory lorakit train wrote the runs in (its --output-dir)")
    p.add_argument("--sort", default=DEFAULT_SORT, choices=list(SORT_COLUMNS), metavar="COLUMN",
                   help=f"order by one of: {', '.join(SORT_COLUMNS)}; loss and score by their value after "
                        f"training, runs without the value last (default: {DEFAULT_SORT}, oldest first)")
    p.add_argument("--reverse", action="store_true", help="the other way round (--sort date: newest first)")
    p.add_argument("--json", action="store_true", help="print the runs as a JSON list of objects")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="compare two runs (run directories, or names of runs under --dir): the settings that "
                        "differ, their results, and their loss curves in one plot")
    p.add_argument("--plot", metavar="FILE",
                   help="where --compare draws the curves (default: DIR/compare-A-B.png, DIR being --dir)")
    p.set_defaults(func=_runs)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    docs = field_docs(TrainConfig) | field_docs(AdapterSettings)
    group = parser.add_argument_group("training options (TrainConfig fields and the adapter's settings)")
    types = {f.name: f for f in dataclasses.fields(TrainConfig) + dataclasses.fields(AdapterSettings)}
    for f in (types[name] for name in setting_names()):
        flags = (ALIASES.get(f.name, "--" + f.name.replace("_", "-")), *SECOND_NAMES.get(f.name, ()))
        # default=None so that only the flags given override --config; the help states the real
        # default. A "%" in a docstring is escaped: argparse formats help text with %-directives.
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = ({True: "on", False: "off"} if f.type == "bool" else {True: "true", False: "false"}).get(
            default, default) if isinstance(default, bool) else "unset" if default is None else default
        text = (docs.get(f.name, "") + f" (default: {shown})").strip().replace("%", "%%")
        kwargs = {"dest": f.name, "default": None, "help": text}
        if f.type in ("bool",):
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif f.name in ("target_modules", "loss_type"):
            group.add_argument(*flags, nargs="+", metavar="NAME", **kwargs)
        elif f.name == "data_fields":
            group.add_argument(*flags, action="append", metavar="FIELD=COLUMN", **kwargs)
        elif f.name == "loss_weights":
            group.add_argument(*flags, nargs="+", type=float, metavar="W", **kwargs)
        elif f.name == "report_to":  # one value, comma-separated (so $LORAKIT_REPORT_TO sets it too)
            kwargs["help"] = kwargs["help"].replace("(default: [])", "(default: none)")
            group.add_argument(*flags, metavar="NAME[,NAME]", **kwargs)
        else:
            kind = {"int": int, "float": float, "Optional[int]": int, "Optional[float]": float}.get(str(f.type), str)
            group.add_argument(*flags, type=kind, **kwargs)


def _train(args) -> int:
    if args.nproc < 1:
        raise ConfigError(f"--nproc {args.nproc}: must be a positive number of processes")
    if args.nproc > 1 and distributed.started_by_torchrun():
        raise ConfigError("--nproc: this process is already one of several that torchrun started; "
                          "give --nproc-per-node to torchrun, or run lorakit train --nproc N without torchrun")
    if args.nproc > 1:
        return distributed.launch(args.nproc, ["-m", "lorakit", *_without_nproc(args.argv)])
    overrides = {name: getattr(args, name, None) for name in setting_names()}
    config_file = args.config
    if args.resume:
        if not config_file:
            _check_started(Path(args.resume), overrides)
        config_file = config_file or str(Path(args.resume) / "config.yaml")
        overrides["run_dir"] = args.resume
    losses = overrides.get("loss_type")
    if losses and len(losses) == 1:
        overrides["loss_type"] = losses[0]  # one loss: a name, as config.yaml writes it
    targets = overrides.get("target_modules")
    if targets and len(targets) == 1 and targets[0] == "all-linear":
        overrides["target_modules"] = "all-linear"
    config = load_train_config(config_file, **overrides)
    result = train(config, resume=bool(args.resume), progress=not args.no_progress)
    print(f"variant: {result.summary.get('variant', 'LoRA')}")
    print(f"adapter: {result.adapter_dir}")
    print(f"report:  {result.run_dir / 'report.md'}")
    if result.score_after:
        before = result.score_before["exact"] if result.score_before else None
        shown = "not measured" if before is None else f"{before:.1%}"
        start = "with the starting adapter" if config.init_adapter else "untuned"
        print(f"held-out exact match: {shown} {start} -> {result.score_after['exact']:.1%} with the adapter")
    return 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line given, without --nproc and its value (each worker is one process)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _check_started(run_dir: Path, overrides: dict) -> None:
    """`--resume RUN_DIR` needs the config.yaml a started run writes first: without it (a kill
    while the run directory was being made) the run never started, and is started again."""
    flags = " ".join(_flag(k, v) for k, v in overrides.items() if v is not None and k != "run_dir")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir}: no such run directory, so nothing to resume (runs are under --output-dir, "
                              f"default runs/; a run killed before it made its directory never started: start it "
                              f"again with: {restart_command(run_dir, flags, use_config=False)})")
    config = run_dir / "config.yaml"
    if config.is_file():
        try:
            load_train_config(config)
            return
        except ConfigError:
            if (run_dir / "checkpoints").is_dir():
                raise  # a config.yaml spoiled later: its own error says what is wrong
    raise CheckpointError(
        f"{run_dir}: the run never started (its config.yaml is {'incomplete' if config.is_file() else 'missing'}: "
        f"it was stopped while its run directory was being made), so there is nothing to resume; start it "
        f"again with: {restart_command(run_dir, flags, use_config=False)}")


def _flag(name: str, value) -> str:
    """The command-line flag that gives ``name`` the ``value``."""
    flag = ALIASES.get(name, "--" + name.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, (list, tuple)):
        return f"{flag} {' '.join(shlex.quote(str(v)) for v in value)}"
    return f"{flag} {shlex.quote(str(value))}"


def _eval(args) -> int:
    result = evaluate_adapter(args.adapter, model=args.model, data=args.data, examples=args.examples,
                              max_new_tokens=args.max_new_tokens)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())
    return 0


def _runs(args) -> int:
    if args.compare:
        comparison = compare_runs(*(find_run(name, args.dir) for name in args.compare))
        if args.json:
            print(json.dumps({"a": comparison.a.as_dict(), "b": comparison.b.as_dict(),
                              "differences": [{"setting": k, "a": a, "b": b} for k, a, b in comparison.differences]},
                             indent=2, default=str))
        else:
            print(format_comparison(comparison))
        plot = plot_comparison(comparison, args.plot or default_plot_path(comparison, args.dir))
        print(f"plot: {plot}", file=sys.stderr if args.json else sys.stdout)
        return 0
    if args.plot:
        raise ConfigError("--plot FILE: draws the curves of --compare A B; give both, or leave --plot out")
    rows = sort_runs(list_runs(args.dir), args.sort, args.reverse)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
    elif not rows:
        print(f"no runs under {args.dir} (lorakit train writes them under its --output-dir, default runs/; "
              f"--dir DIR lists another directory)")
    else:
        print(format_table(rows))
    return 0
