"""The runs under a directory, one row each: what was trained, how far, how well, how it ended.

A run directory is what `train()` writes (config.yaml, metrics.jsonl, status.json, adapter/,
checkpoints/, report.md). `read_run` reads one into a `RunRow`; a file it cannot read becomes the
row's ``problem`` rather than an error, so that one spoiled run never hides the others. `list_runs`
reads every run under a directory (other directories are skipped), `sort_runs` orders them by a
column and `format_table` lays them out. ``lorakit runs`` prints that table (docs/RUNS.md).

Status: status.json's, when the run has one (`lorakit.train.status`); an older run's is inferred
from its files: adapter/ and report.md -> finished, a checkpoint -> interrupted, else unknown.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import ConfigError
from lorakit.train.config import TrainConfig, load_train_config
from lorakit.train.status import STATUS_FILE, RunStatus, read_status

__all__ = ["RunRow", "read_run", "read_metrics_lines", "run_config", "list_runs", "looks_like_run",
           "sort_runs", "format_table", "format_cells", "run_directories", "SORT_COLUMNS", "DEFAULT_SORT"]

RUN_FILES = ("config.yaml", "metrics.jsonl", "status.json")
"""A directory with one of these is a run (one without them is skipped)."""


@dataclass
class RunRow:
    """One run, as the table and ``--json`` show it."""

    name: str
    """The run directory's name (what ``--compare`` takes)."""
    path: str
    date: str | None = None
    """When it started: ISO 8601, local time (status.json, else the stamp in its name)."""
    model: str | None = None
    data: str | None = None
    method: str | None = None
    r: int | None = None
    lora_alpha: float | None = None
    target_modules: list[str] | str | None = None
    steps: int | None = None
    """Optimizer steps done (the newest logged or checkpointed)."""
    planned_steps: int | None = None
    train_seconds: float | None = None
    heldout_before: float | None = None
    """Held-out loss of the untuned model (step 0)."""
    heldout_after: float | None = None
    """The newest held-out loss: the final one of a finished run."""
    heldout_step: int | None = None
    score_before: float | None = None
    """Exact match on the held-out examples scored, untuned (0 to 1)."""
    score_after: float | None = None
    status: str = "unknown"
    """finished, running, interrupted, killed, failed or unknown (docs/RUNS.md)."""
    message: str | None = None
    """Why it stopped (the error, the signal), or how the status was inferred."""
    problem: str | None = None
    """What could not be read (config.yaml, metrics.jsonl, status.json), with the reason."""
    hostname: str | None = None
    pid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dict(vars(self))


def looks_like_run(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in RUN_FILES)


def run_config(run_dir: Path) -> tuple[TrainConfig | None, dict, str | None]:
    """The run's config.yaml: as a TrainConfig (None when it does not load), as the raw mapping
    (what could be read), and the problem, if any."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None, {}, "config.yaml is missing (the run was stopped while its directory was being made)"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as err:  # where and what, without the excerpt it quotes
        mark = err.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        return None, {}, f"config.yaml is not valid YAML ({where}{err.problem or err.context})"
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError, RecursionError) as err:
        return None, {}, f"config.yaml cannot be read ({_one_line(err)})"
    raw = raw if isinstance(raw, dict) else {}
    try:
        return load_train_config(path), raw, None
    except (ConfigError, TypeError, ValueError) as err:
        return None, raw, f"config.yaml: {_one_line(err)}"


def read_metrics_lines(run_dir: Path) -> tuple[list[dict], str | None]:
    """The records of metrics.jsonl that read, and the problem with the others (the first one
    named). A missing file is no records and no problem (a run that had not logged yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return [], None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return [], f"metrics.jsonl cannot be read ({_one_line(err)})"
    records, bad = [], []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad.append(number)
    problem = None
    if bad:
        problem = (f"metrics.jsonl: {len(bad)} line(s) not a metrics record (line {bad[0]}"
                   f"{', ...' if len(bad) > 1 else ''}); the others are shown")
    return records, problem


def read_run(run_dir: str | os.PathLike) -> RunRow:
    """One run directory as a row; what cannot be read is the row's ``problem``."""
    run_dir = Path(run_dir)
    row = RunRow(name=run_dir.name, path=str(run_dir))
    config, raw, problem = run_config(run_dir)
    _add_problem(row, problem)
    if config is not None:
        row.model, row.data, row.method = config.model, config.data, config.method
        row.r, row.lora_alpha = config.lora.r, config.lora.lora_alpha
        targets = config.lora.target_modules
        row.target_modules = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        row.planned_steps = config.max_steps
    else:
        row.model, row.data, row.method = (_text(raw.get(k)) for k in ("model", "data", "method"))
    records, problem = read_metrics_lines(run_dir)
    _add_problem(row, problem)
    _fill_metrics(row, records)
    checkpoint_steps = [int(m.group(1)) for p in _listing(run_dir / "checkpoints")
                        if (m := re.fullmatch(r"step-(\d+)", p.name))]
    row.steps = max([s for s in (row.steps, *checkpoint_steps) if s is not None], default=None)
    try:
        status = read_status(run_dir)
    except (OSError, ValueError) as err:
        status = None
        _add_problem(row, f"status.json cannot be read ({_one_line(err)})")
    _fill_status(row, status, run_dir, checkpoint_steps)
    if row.status in ("killed", "interrupted") and checkpoint_steps and "--resume" not in (row.message or ""):
        row.message = (f"{row.message}; continue from step {max(checkpoint_steps)} with: "
                       f"lorakit train --resume {run_dir}")
    row.date = (status.started if status else None) or _stamp(run_dir)
    if row.status == "finished" and row.planned_steps is None:
        row.planned_steps = row.steps
    return row


def _fill_metrics(row: RunRow, records: list[dict]) -> None:
    train = [m for m in records if m.get("kind") == "train"]
    evals = [m for m in records if m.get("kind") == "eval" and _number(m.get("eval_loss")) is not None]
    if train:
        row.steps = train[-1]["step"]
        row.train_seconds = _number(train[-1].get("elapsed_s"))
    row.heldout_before = next((_number(m["eval_loss"]) for m in evals if m["step"] == 0), None)
    later = [m for m in evals if m["step"] > 0]
    if later:
        row.heldout_after, row.heldout_step = _number(later[-1]["eval_loss"]), later[-1]["step"]
    for m in records:
        if m.get("kind") == "score" and m.get("phase") in ("before", "after"):
            setattr(row, f"score_{m['phase']}", _number(m.get("exact")))


def _fill_status(row: RunRow, status: RunStatus | None, run_dir: Path, checkpoint_steps: list[int]) -> None:
    if status is not None:
        row.status, row.message = status.status, status.message
        row.hostname, row.pid = status.hostname, status.pid
        row.planned_steps = status.planned_steps or row.planned_steps
        return
    unrecorded = "status.json unreadable" if (run_dir / STATUS_FILE).exists() else "no status.json (an older run)"
    if (run_dir / "adapter").is_dir() and (run_dir / "report.md").is_file():
        row.status = "finished"
    elif checkpoint_steps:
        row.status = "interrupted"
        row.message = f"inferred from its files: checkpoints, no final adapter ({unrecorded})"
    else:
        row.status, row.message = "unknown", (f"{unrecorded}, no final adapter and no checkpoint: it failed, or "
                                              "was stopped before its first checkpoint")


def list_runs(directory: str | os.PathLike) -> list[RunRow]:
    """Every run directly under ``directory``, by name; directories that are not runs are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ConfigError(f"{directory}: no such directory; lorakit train writes runs under --output-dir "
                          f"(default runs/): give that directory with --dir DIR")
    return [read_run(p) for p in run_directories(directory)]


def run_directories(directory: Path) -> list[Path]:
    """The run directories directly under ``directory``, by name."""
    return [p for p in sorted(_listing(Path(directory))) if not p.name.startswith(".") and looks_like_run(p)]


SORT_COLUMNS = {
    "name": lambda r: r.name, "date": lambda r: r.date, "model": lambda r: r.model, "data": lambda r: r.data,
    "method": lambda r: r.method, "r": lambda r: r.r, "alpha": lambda r: r.lora_alpha,
    "targets": lambda r: _targets_text(r.target_modules), "steps": lambda r: r.steps,
    "time": lambda r: r.train_seconds, "loss": lambda r: r.heldout_after, "score": lambda r: r.score_after,
    "status": lambda r: r.status,
}
"""``--sort`` columns: the held-out loss and score sort by their value after training."""
DEFAULT_SORT = "date"


def sort_runs(rows: list[RunRow], by: str = DEFAULT_SORT, reverse: bool = False) -> list[RunRow]:
    """Ascending by ``by``, ties by date then name (``reverse``: all the other way round); runs
    without that value come last either way."""
    if by not in SORT_COLUMNS:
        raise ConfigError(f"--sort {by}: not a column; sort by one of {', '.join(SORT_COLUMNS)}")
    column = SORT_COLUMNS[by]
    known = [r for r in rows if column(r) is not None]
    unknown = sorted((r for r in rows if column(r) is None), key=lambda r: (r.date or "", r.name), reverse=reverse)
    return sorted(known, key=lambda r: (column(r), r.date or "", r.name), reverse=reverse) + unknown


# column title, cell text, right-aligned, widest cell
_COLUMNS = (
    ("RUN", lambda r: _shorten(r.name, 34), False),
    ("STARTED", lambda r: r.date.replace("T", " ")[:16] if r.date else "?", False),
    ("MODEL", lambda r: _shorten(_leaf(r.model), 24), False),
    ("DATA", lambda r: _shorten(_leaf(r.data), 20), False),
    ("R", lambda r: _fmt(r.r), True),
    ("ALPHA", lambda r: _fmt(r.lora_alpha), True),
    ("TARGETS", lambda r: _targets_text(r.target_modules, 26) or "?", False),
    ("STEPS", lambda r: f"{_fmt(r.steps)}/{_fmt(r.planned_steps)}", True),
    ("TIME", lambda r: _duration(r.train_seconds), True),
    ("HELD-OUT LOSS", lambda r: _before_after(r.heldout_before, r.heldout_after, "{:.4g}", r), True),
    ("EXACT MATCH", lambda r: _before_after(r.score_before, r.score_after, "{:.1%}"), True),
    ("STATUS", lambda r: r.status, False),
)


def format_table(rows: list[RunRow]) -> str:
    """The runs as a table whose columns fit their content, then a note for each run that stopped
    early or has a problem (the full text, which the table would cut)."""
    cells = [list(format_cells(r).values()) for r in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (title, _, _) in enumerate(_COLUMNS)]

    def line(values):
        return "  ".join(v.rjust(w) if right else v.ljust(w)
                         for v, w, (_, _, right) in zip(values, widths, _COLUMNS)).rstrip()

    out = [line([title for title, _, _ in _COLUMNS]), *(line(c) for c in cells)]
    notes = [(r.name, text) for r in rows for text in (
        f"{r.status}: {r.message}" if r.message and r.status != "finished" else None, r.problem) if text]
    if notes:
        width = max(len(name) for name, _ in notes)
        out += ["", *(f"{name.ljust(width)}  {text}" for name, text in notes)]
    return "\n".join(out)


def format_cells(row: RunRow) -> dict[str, str]:
    """The row's table cells by column title, shortened to fit."""
    return {title: text(row) for title, text, _ in _COLUMNS}


def _before_after(before: float | None, after: float | None, style: str, row: RunRow | None = None) -> str:
    if after is None:
        return "-" if before is None else f"{style.format(before)} -> ?"
    shown = style.format(after)
    if row is not None and row.heldout_step is not None and row.heldout_step != row.steps:
        shown += f" @{row.heldout_step}"  # an earlier evaluation than the last step
    return shown if before is None else f"{style.format(before)} -> {shown}"


def _targets_text(targets: list[str] | str | None, width: int | None = None) -> str | None:
    """"k_proj,q_proj,+5" when the whole list would be wider than ``width``."""
    if targets is None or isinstance(targets, str):
        return targets if targets is None or width is None else _shorten(targets, width)
    shown = ",".join(targets)
    if width is None or len(shown) <= width:
        return shown
    for n in range(len(targets) - 1, 0, -1):
        shown = ",".join(targets[:n]) + f",+{len(targets) - n}"
        if len(shown) <= width:
            return shown
    return f"{len(targets)} modules"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _shorten(text: str | None, width: int) -> str:
    """The text, or its start and end around "..." when wider than ``width``."""
    if text is None:
        return "?"
    if len(text) <= width:
        return text
    keep = width - 3
    return text[: keep - keep // 2] + "..." + text[len(text) - keep // 2:]


def _leaf(value: str | None) -> str | None:
    """A path's last part ("data/my.jsonl" -> "my.jsonl"); a name as it is."""
    return None if value is None else (Path(value).name or value) if "/" in value else value


def _stamp(run_dir: Path) -> str | None:
    """When a run without status.json started: the stamp `lorakit train` puts in its name, else
    the time its config.yaml was written."""
    found = re.match(r"(\d{8}-\d{6})", run_dir.name)
    if found:
        try:
            return datetime.strptime(found.group(1), "%Y%m%d-%H%M%S").isoformat()
        except ValueError:
            pass
    try:
        return datetime.fromtimestamp((run_dir / "config.yaml").stat().st_mtime).isoformat(timespec="seconds")
    except OSError:
        return None


def _listing(directory: Path) -> list[Path]:
    try:
        return [p for p in directory.iterdir() if p.is_dir()]
    except OSError:
        return []


def _add_problem(row: RunRow, problem: str | None) -> None:
    if problem:
        row.problem = problem if row.problem is None else f"{row.problem}; {problem}"


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None


def _fmt(value: Any) -> str:
    if value is None:
        return "?"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
