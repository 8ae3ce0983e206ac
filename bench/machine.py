"""The machine a benchmark ran on, and its results file (shared by the bench scripts)."""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("lorakit", "torch", "transformers", "peft", "accelerate")


def machine() -> dict:
    """Platform, CPU model, core count, GPU (if any), Python and package versions, the command."""
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
               platform.processor())
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "python": platform.python_version(), **versions,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def write_result(path: str | Path, result: dict) -> None:
    """``result`` as indented JSON at ``path`` (its folder made), and a line saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
