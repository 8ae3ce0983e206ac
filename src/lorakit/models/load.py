"""Load a base model and its tokenizer by name or path.

``load_model()`` with no argument gives the embedded default, SmolLM2-135M-Instruct. A name or
path resolves to a safetensors model directory (``resolve_model_dir``):

- an embedded model's name (``"smollm2-135m"``): its GGUF, converted once into the cache;
- a ``.gguf`` file: converted once into the cache, keyed by the file's path, size and mtime;
- a local Hugging Face model directory: used as it is, after checking it has what loading needs.

Nothing is downloaded, and pickled ``*.bin`` weights are never loaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ConfigError, ModelLoadError
from .cache import cache_dir
from .gguf import DEFAULT_MODEL, EMBEDDED_MODELS, convert_gguf, embedded_gguf_path, gguf_cache_name
from .quantized import bnb_config, check_quantized, release_file

__all__ = [
    "DEFAULT_MODEL", "resolve_model_dir", "check_model_dir", "load_model", "load_tokenizer", "parse_dtype",
]

# Any one of these makes a tokenizer loadable without the hub.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.bfloat16`` or one of its names (``"bf16"``, ``"bfloat16"``, ...) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ConfigError(f"dtype {dtype!r} is not supported; use one of: {', '.join(sorted(_DTYPES))}")


def _models_dir() -> Path:
    return cache_dir() / "models"


def check_model_dir(path: Path) -> None:
    """Raise ModelLoadError naming everything a model directory lacks (config, weights, tokenizer)."""
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            missing.append(
                "*.safetensors weights (it holds pickled .bin/.pt weights, which lorakit never loads: "
                "convert them once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir))"
            )
        else:
            missing.append("*.safetensors weights")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise ModelLoadError(
            f"model directory {path} lacks {'; '.join(missing)}; pass a complete Hugging Face model "
            f"directory, a .gguf file, or one of the embedded models: {', '.join(EMBEDDED_MODELS)}"
        )


def resolve_model_dir(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """The safetensors model directory for ``name_or_path``, converting a GGUF once if needed."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        target = _models_dir() / name
        if not target.is_dir():
            convert_gguf(embedded_gguf_path(name), target)
        return target

    path = Path(name).expanduser()
    if not path.exists():
        hint = (
            "lorakit never downloads from the hub; pass a local model directory or .gguf file"
            if "/" in name and not name.startswith((".", "/", "~"))
            else "check the path"
        )
        raise ModelLoadError(
            f"model {name!r} not found: no such file or directory, and not an embedded model "
            f"({', '.join(EMBEDDED_MODELS)}); {hint}"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelLoadError(
                f"model file {path} is not a .gguf file; pass a .gguf file or a Hugging Face model "
                "directory (config.json + *.safetensors + tokenizer files)"
            )
        target = _models_dir() / gguf_cache_name(path)
        if not target.is_dir():
            convert_gguf(path, target)
        return target
    check_model_dir(path)
    return path


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL):
    """The tokenizer of a model (resolved as ``resolve_model_dir`` does), with a pad token set."""
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the tokenizer in {model_dir}: {type(exc).__name__}: {exc}; "
            "check its tokenizer files"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
):
    """Load ``(model, tokenizer)``: a causal language model in eval mode, and its tokenizer.

    ``name_or_path`` is an embedded model name (default ``"smollm2-135m"``), a ``.gguf`` file or
    a Hugging Face model directory. The first use of a GGUF converts it (about 20 s for 135M
    parameters); later loads read the cached safetensors directory (about a second).
    ``quantize`` ("nf4", "fp4", "int8"; `lorakit.models.quantized`) stores the linear layers but
    the output head in 4 or 8 bits, computing in ``dtype``; the rest of the model is in ``dtype``.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    model_dir = resolve_model_dir(name_or_path)
    tokenizer = load_tokenizer(model_dir)
    options = {}
    if quantize is not None:  # quantized as loaded, on the device it will run on (no .to() afterwards)
        options = {"quantization_config": bnb_config(quantize, torch_dtype), "device_map": {"": str(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch_dtype, use_safetensors=True, local_files_only=True, **options
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load the model in {model_dir}: {type(exc).__name__}: {exc}; check that "
            "config.json and the *.safetensors files belong together and are complete"
        ) from exc
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantize is not None:
        check_quantized(model, quantize, model_dir)
        release_file(model)
        return model.eval(), tokenizer
    return model.to(device).eval(), tokenizer
