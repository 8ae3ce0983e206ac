"""Two runs side by side: the settings that differ, how far each got and how well, and both runs'
loss curves (training and held-out) in one plot. ``lorakit runs --compare A B`` prints and draws it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError
from lorakit.train.config import TRAIN_METHODS
from lorakit.train.report import loss_curves
from lorakit.train.runs import (RunRow, format_cells, looks_like_run, read_metrics_lines, read_run, run_config,
                                run_directories)

__all__ = ["Comparison", "find_run", "compare_runs", "format_comparison", "comparison_figure", "plot_comparison",
           "default_plot_path"]

IGNORED = ("run_dir",)
"""Settings that always differ between two runs, left out of the differences."""


@dataclass
class Curve:
    train: list[tuple[int, float]]
    """(step, training loss) as logged."""
    heldout: list[tuple[int, float]]
    """(step, held-out loss), from the untuned model's (step 0) on."""


@dataclass
class Comparison:
    a: RunRow
    b: RunRow
    differences: list[tuple[str, Any, Any]]
    """(setting, A's value, B's value) for each setting of config.yaml that differs, by name;
    ``lora.*`` are the adapter's LoraConfig fields."""
    curves: tuple[Curve, Curve]


def find_run(name: str, directory: str | os.PathLike) -> Path:
    """A run directory: ``name`` as a path, a run's name under ``directory``, or the one run there
    whose name contains it ("demo" for 20261207-014143-demo)."""
    directory = Path(directory)
    for candidate in (Path(name), directory / name):
        if looks_like_run(candidate):
            return candidate
    found = run_directories(directory) if directory.is_dir() else []
    matches = [p for p in found if name in p.name]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"{name!r} matches {len(matches)} runs under {directory}: "
                          f"{', '.join(p.name for p in matches)}; give one's full name")
    listed = f"the runs there: {', '.join(p.name for p in found)}" if found else "it holds no runs"
    raise ConfigError(f"no run {name!r}: not a run directory, nor a run under {directory} ({listed}); give a "
                      f"run directory or a run's name, and --dir DIR for runs under another directory")


def compare_runs(a: str | os.PathLike, b: str | os.PathLike) -> Comparison:
    """Compare two run directories."""
    rows, settings, curves = [], [], []
    for run_dir in (Path(a), Path(b)):
        rows.append(read_run(run_dir))
        settings.append(_settings(run_dir))
        curves.append(_curve(run_dir))
    keys = sorted((settings[0].keys() | settings[1].keys()) - set(IGNORED))
    missing = object()
    differences = [(k, settings[0].get(k, missing), settings[1].get(k, missing)) for k in keys
                   if settings[0].get(k, missing) != settings[1].get(k, missing)]
    differences = [(k, *("(not set)" if v is missing else v for v in values)) for k, *values in differences]
    return Comparison(rows[0], rows[1], differences, (curves[0], curves[1]))


def _settings(run_dir: Path) -> dict[str, Any]:
    """config.yaml as flat ``key: value`` settings, the adapter's as every LoraConfig field
    (``lora.r``, defaults included, so that a default on one side and a value on the other differ)."""
    config, raw, _ = run_config(run_dir)
    values = raw
    if config is not None:
        values = {**config.to_dict(), "lora": config.lora.to_dict()}
    return _flat(values)


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = sorted(value) if isinstance(value, (set, tuple)) else value
    return out


def _curve(run_dir: Path) -> Curve:
    records, _ = read_metrics_lines(run_dir)
    return Curve(*loss_curves(records))


def format_comparison(comparison: Comparison, width: int = 40) -> str:
    """The two runs side by side: the settings that differ, then their results."""
    a, b = comparison.a, comparison.b
    results = [("started", "STARTED"), ("steps", "STEPS"), ("training time", "TIME"),
               ("held-out loss", "HELD-OUT LOSS"), ("exact match", "EXACT MATCH"), ("status", "STATUS")]
    cells_a, cells_b = format_cells(a), format_cells(b)
    rows: list[tuple[str, str, str]] = [("run", a.name, b.name), ("", a.path, b.path)]
    if comparison.differences:
        rows.append(("settings that differ", "", ""))
        rows += [(f"  {key}", _shown(va, width), _shown(vb, width)) for key, va, vb in comparison.differences]
    else:
        rows.append(("settings that differ", "none (run_dir aside)", ""))
    rows.append(("results", "", ""))
    rows += [(f"  {label}", cells_a[column], cells_b[column]) for label, column in results]
    first = max(len(r[0]) for r in rows)
    second = max(len(r[1]) for r in rows if r[2] or r[0].startswith(" ") or r[0] == "run")
    return "\n".join(f"{label.ljust(first)}  {va.ljust(second)}  {vb}".rstrip() for label, va, vb in rows)


def _shown(value: Any, width: int) -> str:
    text = ",".join(str(v) for v in value) if isinstance(value, list) else "null" if value is None else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def default_plot_path(comparison: Comparison, directory: str | os.PathLike) -> Path:
    """Where ``--compare`` draws when not told: ``<directory>/compare-<A>-<B>.png``."""
    return Path(directory) / f"compare-{comparison.a.name}-{comparison.b.name}.png"


def comparison_figure(comparison: Comparison):
    """A matplotlib Figure of both runs' training loss (line) and held-out loss (dashed, dots),
    one colour per run, against the optimizer step."""
    # matplotlib is imported here: it is heavy and only plotting needs it. The Figure is drawn by
    # the Agg canvas directly (no pyplot: no global figure state, no backend switch)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for row, curve, color in zip((comparison.a, comparison.b), comparison.curves, ("tab:blue", "tab:orange")):
        if curve.train:
            ax.plot(*zip(*curve.train), color=color, linewidth=1.2, label=f"{row.name}: training")
        if curve.heldout:
            ax.plot(*zip(*curve.heldout), color=color, linestyle="--", marker="o", linewidth=1.5,
                    label=f"{row.name}: held-out")
    ax.set_xlabel("optimizer step")
    supervised = all(row.method in TRAIN_METHODS and not TRAIN_METHODS[row.method].preference
                     for row in (comparison.a, comparison.b))
    ax.set_ylabel("cross-entropy per answer token" if supervised else "loss (each run's own objective)")
    ax.set_title(f"{comparison.a.name} vs {comparison.b.name}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def plot_comparison(comparison: Comparison, path: str | os.PathLike) -> Path:
    """Draw `comparison_figure` to ``path`` (PNG)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ConfigError(f"--plot {path}: the directory {path.parent} does not exist; create it or plot elsewhere")
    comparison_figure(comparison).savefig(path)
    return path
