"""Checkpoints: plain files, written atomically, verified by a manifest of hashes.

    checkpoints/step-000200/
        adapter/                  the adapter (PEFT layout)
        optimizer.safetensors     AdamW moments and step counts, per parameter index
        torch_rng.safetensors     the CPU (and CUDA) random-number generator states
        state.json                step, data position, optimizer param groups, Python RNG, totals
        manifest.json             sha256 of every file above; written last

A checkpoint is written into a temporary directory beside the final one, its manifest last, and
renamed into place, so a crash at any moment leaves either the whole checkpoint or none.
`latest_checkpoint` takes the newest directory whose manifest verifies. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import CheckpointError

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "verify_checkpoint"]

MANIFEST = "manifest.json"


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


def save_checkpoint(directory: Path, *, peft_model, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 0) -> Path:
    """Write a checkpoint to ``directory`` atomically; then keep only the newest ``keep``."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        peft_model.save_pretrained(tmp / "adapter")
        tensors, param_groups = _optimizer_tensors(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "torch_rng.safetensors"))
        full_state = {**state, "param_groups": param_groups, "python_rng": _python_rng_state()}
        (tmp / "state.json").write_text(json.dumps(full_state, indent=2))
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): _sha256(p) for p in files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(directory.parent, keep)
    return directory


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
    """None if every file listed in the manifest is present with its hash; else what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "manifest.json is not valid JSON"
    for name, digest in manifest.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its hash"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of a run that verifies; broken ones are reported and passed over."""
    parent = Path(run_dir) / "checkpoints"
    for candidate in sorted((p for p in parent.glob("step-*") if p.is_dir()), reverse=True):
        problem = verify_checkpoint(candidate)
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
