"""Base models: the embedded default (SmolLM2-135M-Instruct), GGUF files, HF model directories,
and the one loader of a base model with adapters (`load_adapted`)."""

from .adapters import base_model_for, load_adapted
from .cache import cache_dir
from .gguf import EMBEDDED_MODELS, convert_gguf, embedded_gguf_path
from .load import DEFAULT_MODEL, check_model_dir, load_model, load_tokenizer, parse_dtype, resolve_model_dir

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "base_model_for",
    "load_adapted",
    "cache_dir",
    "check_model_dir",
    "convert_gguf",
    "embedded_gguf_path",
    "load_model",
    "load_tokenizer",
    "parse_dtype",
    "resolve_model_dir",
]
