"""``<run_dir>/status.json``: whether a run is running, finished, interrupted or failed.

The trainer writes it (rank 0 only, atomically) when the run has set up, and again when it ends::

    {"status": "running", "pid": 4242, "hostname": "box", "started": "2026-12-07T01:41:43",
     "ended": null, "planned_steps": 250, "message": null, "resumes": 0}

``status`` is then "finished", "interrupted" (a signal: resumable) or "failed" (``message``: the
error in one line). A record that still says "running" after its process died (kill -9, out of
memory, a reboot) reads as "killed" on the host that ran it (`read_status`).
"""

from __future__ import annotations

import json
import os
import socket
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from lorakit.errors import TrainingInterrupted

__all__ = ["STATUS_FILE", "RunStatus", "StatusRecorder", "read_status", "process_alive"]

STATUS_FILE = "status.json"


@dataclass
class RunStatus:
    """One run's status.json."""

    status: str
    """running, finished, interrupted or failed (as written); read back, a dead "running" is "killed"."""
    pid: int
    hostname: str
    started: str
    """When the run was first started (ISO 8601, local time); a resumed run keeps it."""
    ended: str | None = None
    planned_steps: int | None = None
    message: str | None = None
    """Why it stopped: the error or the signal, on one line."""
    resumes: int = 0


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")


def _write(run_dir: Path, record: RunStatus) -> None:
    """Write status.json atomically: a temporary file beside it, then a rename."""
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(asdict(record), indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StatusRecorder:
    """What `train()` records, as a context manager: "running" once the run directory is set up
    (`start`), then how the run ended: finished, interrupted (a signal) or failed (any other error).
    Does nothing on ranks other than the first, or when the run stopped before `start`."""

    def __init__(self):
        self.started = _now()
        self.record: RunStatus | None = None
        self.run_dir: Path | None = None

    def __enter__(self) -> "StatusRecorder":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.end(error)

    def start(self, run_dir: Path, planned_steps: int, *, enabled: bool) -> None:
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        earlier = _read_record(self.run_dir)  # a resumed run keeps its first start
        self.record = RunStatus(status="running", pid=os.getpid(), hostname=socket.gethostname(),
                                started=earlier.started if earlier else self.started, planned_steps=planned_steps,
                                resumes=earlier.resumes + 1 if earlier else 0)
        _write(self.run_dir, self.record)

    def end(self, error: BaseException | None) -> None:
        """finished (``error`` None), interrupted (a signal) or failed (any other error). A write
        that fails (a full disk) is a warning: it must not hide how the run ended."""
        if self.record is None:
            return
        if error is None:
            status, message = "finished", None
        elif isinstance(error, (TrainingInterrupted, KeyboardInterrupt)):
            status, message = "interrupted", str(error) or type(error).__name__
        else:
            status, message = "failed", " ".join(f"{type(error).__name__}: {error}".split())
        self.record.status, self.record.message, self.record.ended = status, message, _now()
        try:
            _write(self.run_dir, self.record)
        except OSError as err:
            warnings.warn(f"could not record that the run {status} in {self.run_dir / STATUS_FILE}: {err}",
                          stacklevel=2)


def _read_record(run_dir: Path) -> RunStatus | None:
    try:
        return read_status(run_dir)
    except (OSError, ValueError):
        return None


def read_status(run_dir: str | os.PathLike) -> RunStatus | None:
    """The run's status.json, or None when it has none (a run from before lorakit wrote one).
    "running" reads as "killed" when its process is gone from this host. An unreadable file
    raises OSError or ValueError (not JSON, or not a status record), saying which."""
    path = Path(run_dir) / STATUS_FILE
    if not path.is_file():
        return None
    data: Any = json.loads(path.read_text())
    names = set(RunStatus.__dataclass_fields__)
    required = {"status": str, "pid": int, "hostname": str, "started": str}
    if not isinstance(data, dict) or not all(isinstance(data.get(k), kind) for k, kind in required.items()):
        raise ValueError("not a status record (it needs the texts status, hostname and started, "
                         "and the process id pid)")
    record = RunStatus(**{k: v for k, v in data.items() if k in names})
    if record.status == "running" and record.hostname == socket.gethostname() and not process_alive(record.pid):
        record.status = "killed"
        record.message = f"process {record.pid} ended without recording how (killed, out of memory or a reboot)"
    return record


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user's counts)."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError, TypeError):
        return False
    return True
