"""The training runs as the playground shows them: the `lorakit runs` rows, and one run in full.

A run is named, never given as a path: `find_run` takes one directory name under the runs
directory and resolves it (symlinks followed) to a run directory inside it; anything else is the
same 404, as for adapters (`lorakit.infer.endpoints.find_adapter`), so a client cannot probe the
server's disk. What a run holds is read with `lorakit.train.runs` (the rows, config.yaml,
metrics.jsonl) and `lorakit.train.report` (report.md's data summary).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from lorakit.infer.endpoints import find_adapter
from lorakit.infer.openai_api import RequestError
from lorakit.train.report import loss_curves, read_data_summary
from lorakit.train.runs import list_runs, looks_like_run, read_metrics_lines, read_run, run_config, sort_runs

__all__ = ["find_run", "has_adapter", "run_rows", "run_detail"]


def find_run(runs_dir: str | os.PathLike, name: str) -> Path:
    """The run directory ``runs_dir``/``name``, resolved; ``name`` must be one plain directory
    name of a run directly under ``runs_dir`` (a 404 otherwise, whatever the reason)."""
    root = Path(runs_dir).resolve()
    plain = (name and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name
             and not os.path.isabs(name) and len(name) <= 255)
    if plain:
        try:
            resolved = (root / name).resolve()
            if resolved.parent == root and looks_like_run(resolved):
                return resolved
        except (OSError, RuntimeError):  # unreadable, or a symlink loop: as if absent
            pass
    raise RequestError(f"no run named {name!r} in the server's --runs-dir (send the name of a run directory that "
                       "lorakit train wrote there, as GET /v1/playground/runs lists them)", status=404,
                       param="run", code="run_not_found")


def has_adapter(runs_dir: str | os.PathLike, name: str) -> bool:
    """Whether POST /v1/adapters {"name": NAME} loads this run's adapter with --adapter-dir ``runs_dir``."""
    try:
        find_adapter(Path(runs_dir).resolve(), name, "name")
        return True
    except RequestError:
        return False


def run_rows(runs_dir: str | os.PathLike, served: set[str]) -> list[dict[str, Any]]:
    """Every run under ``runs_dir`` as ``lorakit runs --json`` gives it (oldest first), with
    ``loaded`` (an adapter of its name is served) and ``has_adapter``; [] without the directory.
    A symlink to a run elsewhere, which `lorakit runs` lists, is left out (`find_run` refuses it)."""
    if not Path(runs_dir).is_dir():
        return []
    return [{**row.as_dict(), "loaded": row.name in served, "has_adapter": has_adapter(runs_dir, row.name)}
            for row in sort_runs(list_runs(runs_dir)) if _found(runs_dir, row.name)]


def _found(runs_dir: str | os.PathLike, name: str) -> bool:
    try:
        find_run(runs_dir, name)
        return True
    except RequestError:
        return False


def run_detail(runs_dir: str | os.PathLike, name: str, served: set[str]) -> dict[str, Any]:
    """One run: its status, config.yaml, report.md, loss curves, scores before and after
    training (metrics.jsonl's last score record of each phase) and data summary."""
    run_dir = find_run(runs_dir, name)
    records, _ = read_metrics_lines(run_dir)
    report_path = run_dir / "report.md"
    try:
        report = report_path.read_text(encoding="utf-8") if report_path.is_file() else None
    except (OSError, UnicodeDecodeError):
        report = None
    scores = {m["phase"]: m for m in records if m.get("kind") == "score" and m.get("phase") in ("before", "after")}
    detail = {
        "name": name, "status": read_run(run_dir).status, "config": run_config(run_dir)[1], "report": report,
        "curves": dict(zip(("train", "eval"), loss_curves(records))), "score_before": scores.get("before"), "score_after": scores.get("after"),
        "data_summary": read_data_summary(report or ""), "loaded": name in served,
        "has_adapter": has_adapter(runs_dir, name),
    }
    return _json_safe(detail)


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite number as None (a browser's JSON.parse refuses NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # a YAML date or other scalar: as text
