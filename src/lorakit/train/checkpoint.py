"""Checkpoints: plain files, written atomically, verified by a manifest of hashes.

    checkpoints/step-000200/
        adapter/                  the adapter (PEFT layout)
        optimizer.safetensors     AdamW moments and step counts, per parameter index
        torch_rng.safetensors     the CPU (and CUDA) random-number generator states
        state.json                step, data position, optimizer param groups, Python RNG, totals
        manifest.json             sha256 of every file above; written last

A checkpoint is written into a temporary directory beside the final one, its manifest last, and
renamed into place, so a crash at any moment leaves either the whole checkpoint or none (and a
``.tmp-step-*`` directory, removed by `remove_stale_tmp` when the run starts, resumes or saves).
`latest_checkpoint` takes the newest directory whose manifest verifies: a JSON object that lists
exactly the files above, each with its sha256. Nothing is pickled.

A write that finds the disk full raises `DiskFullError` naming the path, the space it needed
and where else to write (`writing`); the adapter of a run is written beside its place and renamed
into it (`save_adapter_atomically`), so no empty or partial ``adapter/`` is left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lorakit.errors import CheckpointError, DiskFullError

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "verify_checkpoint", "remove_stale_tmp",
           "save_adapter_atomically", "writing", "is_disk_full", "CHECKPOINT_FILES"]

MANIFEST = "manifest.json"
CHECKPOINT_FILES = ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.safetensors",
                    "state.json", "torch_rng.safetensors")
"""The files a checkpoint needs, each listed in its manifest with its sha256 (and nothing else)."""

TMP_PREFIX = ".tmp-"
_STALE_TMP = re.compile(r"\.tmp-(replaced-)?(step-\d+|adapter|initial_adapter)-[A-Za-z0-9_]{6,}")
"""The temporary directories lorakit makes beside checkpoints and adapters (`tempfile.mkdtemp`
names): only these are removed as stale."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """An OSError for a full device (or quota), or safetensors' error wrapping one."""
    if isinstance(err, OSError):
        return err.errno in _FULL
    if isinstance(err, SafetensorError):
        text = str(err)
        return "No space left on device" in text or any(f"os error {code})" in text for code in _FULL)
    return False


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n >= 100_000 else f"{max(n, 1) / 1e3:,.1f} kB"


def _free_bytes(path: Path) -> int | None:
    for parent in (path, *path.parents):
        if parent.exists():
            try:
                return shutil.disk_usage(parent).free
            except OSError:
                return None
    return None


@contextlib.contextmanager
def writing(path: Path, needed: Callable[[], int], *, what: str,
            advice: str | Callable[[], str] = "") -> Iterator[None]:
    """Turn a full disk while writing ``path`` into `DiskFullError`: the path, about how much
    space ``needed()`` bytes is, what is free there, and what to do (``advice``, appended; both
    callables are called only then)."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        if not is_disk_full(err):
            raise
        free = _free_bytes(Path(path))
        shown = "" if free is None else f", {_megabytes(free)} free there"
        raise DiskFullError(
            f"no space left on the device to write {what} {path} (it needs about {_megabytes(needed())}{shown}): "
            f"free some space, or write runs to another disk (--output-dir DIR, or --run-dir DIR)"
            f"{advice() if callable(advice) else advice}"
        ) from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"{index}.{slot}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return tensors, state["param_groups"]


def _trainable_bytes(peft_model) -> int:
    return sum(p.numel() * p.element_size() for p in peft_model.parameters() if p.requires_grad)


def save_checkpoint(directory: Path, *, peft_model, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 0, advice: str | Callable[[], str] = "") -> Path:
    """Write a checkpoint to ``directory`` atomically; then keep only the newest ``keep``.
    A full disk raises `DiskFullError` (``advice`` ends its message) and leaves nothing behind."""
    directory = Path(directory)
    tensors, param_groups = _optimizer_tensors(optimizer)
    needed = lambda: _trainable_bytes(peft_model) + sum(t.nbytes for t in tensors.values()) + 64_000  # noqa: E731
    with writing(directory, needed, what="the checkpoint",
                 advice=lambda: ", or keep fewer checkpoints (--keep-checkpoints)" + (
                     advice() if callable(advice) else advice)):
        directory.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(directory.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{directory.name}-", dir=directory.parent))
        try:
            peft_model.save_pretrained(tmp / "adapter", selected_adapters=["default"])  # not a DPO run's "ref"
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
            save_file(rng, str(tmp / "torch_rng.safetensors"))
            full_state = {**state, "param_groups": param_groups, "python_rng": _python_rng_state()}
            (tmp / "state.json").write_text(json.dumps(full_state, indent=2))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            manifest = {p.relative_to(tmp).as_posix(): _sha256(p) for p in files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _prune(directory.parent, keep)
    return directory


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Rename ``tmp`` to ``directory``; one already there is first renamed aside (a ``.tmp-``
    name, cleaned up later if a kill comes between the renames), then removed."""
    old = None
    if directory.exists():
        old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}replaced-{directory.name}-", dir=directory.parent))
        os.rename(directory, old / directory.name)
    os.rename(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_adapter_atomically(peft_model, directory: Path, *, advice: str | Callable[[], str] = "",
                            **kwargs: Any) -> Path:
    """``peft_model.save_pretrained(directory, **kwargs)`` (the adapter "default" unless
    ``selected_adapters`` says otherwise), written into a temporary directory
    beside it and renamed into place: a kill or a full disk leaves the old directory or none,
    never an empty or partial one. A full disk raises `DiskFullError`."""
    directory = Path(directory)
    name = "initial_adapter" if directory.name == "initial_adapter" else "adapter"
    with writing(directory, lambda: _trainable_bytes(peft_model) + 8_000, what="the adapter", advice=advice):
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=directory.parent))
        try:
            peft_model.save_pretrained(tmp, **{"selected_adapters": ["default"], **kwargs})
            _replace_dir(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return directory


def remove_stale_tmp(directory: Path) -> list[Path]:
    """Remove the temporary directories a killed write left in ``directory`` (a run's
    ``checkpoints/`` or the run directory): only lorakit's own (``.tmp-step-000200-x1y2z3ab``,
    ``.tmp-adapter-...``), only directories, never through a symbolic link. Returns them."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if _STALE_TMP.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _prune(parent: Path, keep: int) -> None:
    if keep <= 0:
        return
    steps = sorted(p for p in parent.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(directory: Path) -> str | None:
    """None if the manifest is a JSON object listing exactly `CHECKPOINT_FILES`, each with a
    sha256 that its file inside ``directory`` matches; else what is wrong."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, OSError):
        return "manifest.json is not valid JSON"
    if not isinstance(manifest, dict):
        return f"manifest.json is a JSON {type(manifest).__name__}, not an object of file: sha256"
    for name, digest in manifest.items():
        parts = PurePosixPath(name).parts
        if name.startswith("/") or "\\" in name or ".." in parts or name not in CHECKPOINT_FILES:
            return f"manifest.json lists {name!r}, not a file of a checkpoint (expected {list(CHECKPOINT_FILES)})"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"manifest.json gives {name} the hash {digest!r}, not a sha256 hex digest"
    missing = [name for name in CHECKPOINT_FILES if name not in manifest]
    if missing:
        return f"manifest.json does not list {missing} (a checkpoint needs all of {list(CHECKPOINT_FILES)})"
    root = directory.resolve()
    for name in CHECKPOINT_FILES:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if not path.resolve().is_relative_to(root):
            return f"{name} points outside the checkpoint directory"
        if _sha256(path) != manifest[name]:
            return f"{name} does not match its hash"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that verifies; broken ones are reported and passed over."""
    parent = Path(run_dir) / "checkpoints"
    for candidate in sorted((p for p in parent.glob("step-*") if p.is_dir()), reverse=True):
        try:
            problem = verify_checkpoint(candidate)
        except OSError as err:  # unreadable: permissions, a directory where a file should be
            problem = f"cannot be read ({err})"
        if problem is None:
            return candidate
        warnings.warn(f"checkpoint {candidate} is not usable ({problem}); trying an older one", stacklevel=2)
    return None


def load_checkpoint(directory: Path, *, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG states from ``directory``; return the saved training state.
    (The adapter weights are loaded by the caller from ``directory / "adapter"``.)"""
    problem = verify_checkpoint(directory)
    if problem is not None:
        raise CheckpointError(f"{directory}: {problem}; delete it to resume from an older checkpoint")
    state = json.loads((directory / "state.json").read_text())
    if not isinstance(state, dict) or not {"param_groups", "python_rng"} <= state.keys():
        raise CheckpointError(f"{directory}: state.json is not a checkpoint's state; delete the checkpoint "
                              "to resume from an older one")
    tensors = load_file(str(directory / "optimizer.safetensors"))
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        index, slot = key.split(".", 1)
        slots.setdefault(int(index), {})[slot] = tensor
    try:
        optimizer.load_state_dict({"state": slots, "param_groups": state.pop("param_groups")})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{directory}: the optimizer state does not fit this run ({err})") from None
    rng = load_file(str(directory / "torch_rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state.pop("python_rng")
    random.setstate((version, tuple(internal), gauss))
    return state
