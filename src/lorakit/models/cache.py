"""Where lorakit keeps converted models, and how it writes a directory atomically.

The cache is ``$LORAKIT_CACHE`` when set, else ``~/.cache/lorakit``. A directory is written under
a temporary name beside its final place and renamed into place when complete, so an interrupted
write never leaves a half directory where a complete one is expected.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["cache_dir", "atomic_directory"]

_PARTIAL = ".partial-"


def cache_dir() -> Path:
    """The lorakit cache root: ``$LORAKIT_CACHE``, else ``~/.cache/lorakit``."""
    env = os.environ.get("LORAKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorakit"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(final: Path) -> None:
    """Delete temporaries of ``final`` left by processes that no longer run (interrupted writes)."""
    prefix = f"{_PARTIAL}{final.name}-"
    for entry in final.parent.glob(prefix + "*"):
        pid = entry.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` when the block completes.

    On an exception the temporary is removed and ``final`` is untouched. If another process
    finished ``final`` first, its directory is kept and ours is discarded (both are complete).
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(final)
    tmp = final.parent / f"{_PARTIAL}{final.name}-{os.getpid()}-{os.urandom(4).hex()}"
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
