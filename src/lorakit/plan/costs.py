"""What an adapter costs in parameters and on disk, computed from the targeted modules.

Parameters: every targeted module adds A (r x in) and B (out x r), so ``r * (in + out)``; DoRA
adds a magnitude vector of ``out``. This is what ``get_peft_model`` makes trainable.

Disk: ``save_pretrained`` writes ``adapter_model.safetensors``, whose size is exactly
``8 + len(header) + sum(numel * itemsize)``: an 8-byte little-endian header length, a JSON header
(``{"__metadata__":{"format":"pt"},"<key>":{"dtype":"F32","shape":[r,in],"data_offsets":[a,b]},
...}``, tensors in name order, padded with spaces to a multiple of 8 bytes), then the raw tensor
bytes. The header is rebuilt here as the safetensors library writes it, so the size is exact.
"""

from __future__ import annotations

import json

from lorakit.plan.targets import TargetedModule

__all__ = ["adapter_tensors", "trainable_params", "safetensors_size", "DTYPE_BYTES",
           "EMBEDDING_LAYER_NAMES"]

PREFIX = "base_model.model."  # PEFT's key prefix in adapter files (lorakit.io writes the same)

# Bytes per element, by safetensors dtype name and by the names people type.
DTYPE_BYTES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1,
               "float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


def trainable_params(targets: list[TargetedModule], use_dora: bool = False) -> int:
    """Parameters LoRA trains: sum over targeted modules of r * (in + out) (+ out with DoRA)."""
    return sum(t.params(use_dora) for t in targets)


# PEFT's save_embedding_layers="auto": when target_modules names one of these (or a regex matches
# a module so named), save_pretrained also writes the targeted layer's frozen weight.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")


def adapter_tensors(targets: list[TargetedModule], use_dora: bool = False,
                    target_modules: tuple[str, ...] | str | None = None,
                    ) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor in the saved adapter file, PEFT's layout.

    ``target_modules`` (as configured) decides PEFT's embedding rule: if it names
    ``embed_tokens`` or ``lm_head``, the frozen weight of each targeted embedding or output head
    is written too, as ``<name>.base_layer.weight`` (a full vocab x hidden table).
    """
    tensors = []
    save_embeddings = _embedding_named(targets, target_modules)
    for t in targets:
        m, key = t.module, PREFIX + t.name
        if m.kind == "embedding":
            tensors += [(f"{key}.lora_embedding_A", (t.r, m.in_features)),
                        (f"{key}.lora_embedding_B", (m.out_features, t.r))]
        else:
            tensors += [(f"{key}.lora_A.weight", (t.r, m.in_features)),
                        (f"{key}.lora_B.weight", (m.out_features, t.r))]
        if use_dora:
            tensors.append((f"{key}.lora_magnitude_vector", (m.out_features,)))
        if save_embeddings and m.group in ("embedding", "head"):
            weight = (m.in_features, m.out_features) if m.kind == "embedding" else (m.out_features, m.in_features)
            tensors.append((f"{key}.base_layer.weight", weight))
    return tensors


def _embedding_named(targets: list[TargetedModule], target_modules) -> bool:
    if isinstance(target_modules, str):
        return any(t.name.rsplit(".", 1)[-1] in EMBEDDING_LAYER_NAMES for t in targets)
    return any(name in (target_modules or ()) for name in EMBEDDING_LAYER_NAMES)


def safetensors_size(tensors: list[tuple[str, tuple[int, ...]]], dtype: str = "F32",
                     metadata: dict[str, str] | None = None) -> int:
    """Exact size in bytes of a safetensors file holding ``tensors`` (all of one dtype)."""
    dtype = {"float32": "F32", "fp32": "F32", "bfloat16": "BF16", "bf16": "BF16",
             "float16": "F16", "fp16": "F16"}.get(dtype, dtype)
    itemsize = DTYPE_BYTES[dtype]
    header: dict[str, object] = {"__metadata__": metadata if metadata is not None else {"format": "pt"}}
    offset = 0
    for key, shape in sorted(tensors):  # the writer orders tensors by dtype, then by name
        nbytes = itemsize * _numel(shape)
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
