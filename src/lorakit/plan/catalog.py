"""Built-in shapes of common models: the config.json fields that fix their parameter counts.

Planning for a model you have not downloaded: ``lorakit plan --model Llama-3-8B``. Each entry is
the relevant part of the model's published config.json; the tests build every one on the meta
device with transformers and compare module by module. Instruct/chat variants share the base
model's shape, so "Qwen2.5-7B-Instruct" finds "Qwen2.5-7B".
"""

from __future__ import annotations

from typing import Any

__all__ = ["CATALOG", "catalog_entry"]


def _llama(h, i, layers, heads, kv, vocab, tied, **more) -> dict[str, Any]:
    return dict(model_type="llama", hidden_size=h, intermediate_size=i, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                tie_word_embeddings=tied, **more)


def _like(model_type, *args, **more) -> dict[str, Any]:
    return {**_llama(*args, **more), "model_type": model_type}


CATALOG: dict[str, dict[str, Any]] = {
    "Llama-3-8B": _llama(4096, 14336, 32, 32, 8, 128256, False, max_position_embeddings=8192),
    "Llama-3.1-8B": _llama(4096, 14336, 32, 32, 8, 128256, False, max_position_embeddings=131072),
    "Llama-3.2-1B": _llama(2048, 8192, 16, 32, 8, 128256, True, head_dim=64,
                           max_position_embeddings=131072),
    "Llama-3.2-3B": _llama(3072, 8192, 28, 24, 8, 128256, True, head_dim=128,
                           max_position_embeddings=131072),
    "Llama-2-7B": _llama(4096, 11008, 32, 32, 32, 32000, False, max_position_embeddings=4096),
    "TinyLlama-1.1B": _llama(2048, 5632, 22, 32, 4, 32000, False, max_position_embeddings=2048),
    "SmolLM2-135M": _llama(576, 1536, 30, 9, 3, 49152, True, max_position_embeddings=8192),
    "SmolLM2-360M": _llama(960, 2560, 32, 15, 5, 49152, True, max_position_embeddings=8192),
    "SmolLM2-1.7B": _llama(2048, 8192, 24, 32, 32, 49152, True, max_position_embeddings=8192),
    "Mistral-7B-v0.1": _like("mistral", 4096, 14336, 32, 32, 8, 32000, False, head_dim=128,
                             max_position_embeddings=32768),
    "Mistral-7B-v0.3": _like("mistral", 4096, 14336, 32, 32, 8, 32768, False, head_dim=128,
                             max_position_embeddings=32768),
    "Qwen2.5-0.5B": _like("qwen2", 896, 4864, 24, 14, 2, 151936, True,
                          max_position_embeddings=32768),
    "Qwen2.5-1.5B": _like("qwen2", 1536, 8960, 28, 12, 2, 151936, True,
                          max_position_embeddings=32768),
    "Qwen2.5-3B": _like("qwen2", 2048, 11008, 36, 16, 2, 151936, True,
                        max_position_embeddings=32768),
    "Qwen2.5-7B": _like("qwen2", 3584, 18944, 28, 28, 4, 152064, False,
                        max_position_embeddings=32768),
    "Qwen3-0.6B": _like("qwen3", 1024, 3072, 28, 16, 8, 151936, True, head_dim=128,
                        max_position_embeddings=40960),
    "Qwen3-8B": _like("qwen3", 4096, 12288, 36, 32, 8, 151936, False, head_dim=128,
                      max_position_embeddings=40960),
    "Gemma-2-2B": _like("gemma2", 2304, 9216, 26, 8, 4, 256000, True, head_dim=256,
                        max_position_embeddings=8192),
    "Gemma-2-9B": _like("gemma2", 3584, 14336, 42, 16, 8, 256000, True, head_dim=256,
                        max_position_embeddings=8192),
    "Phi-3-mini": _like("phi3", 3072, 8192, 32, 32, 32, 32064, False,
                        max_position_embeddings=4096),
    "GPT-2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, n_positions=1024,
                  vocab_size=50257, tie_word_embeddings=True),
}

_ALIASES = {
    "meta-llama-3-8b": "Llama-3-8B", "llama3-8b": "Llama-3-8B",
    "meta-llama-3.1-8b": "Llama-3.1-8B",
    "mistral-7b": "Mistral-7B-v0.3",
    "phi-3-mini-4k": "Phi-3-mini", "gpt2": "GPT-2",
}
_VARIANT_SUFFIXES = ("-instruct", "-it", "-chat", "-hf", "-base")


def _key(name: str) -> str:
    return name.strip().rsplit("/", 1)[-1].lower()


_BY_KEY = {_key(name): name for name in CATALOG} | _ALIASES


def catalog_entry(name: str) -> tuple[str, dict[str, Any]] | None:
    """(canonical name, config fields) for a built-in model name or hub id, or None."""
    key = _key(name)
    while True:
        if key in _BY_KEY:
            canonical = _BY_KEY[key]
            return canonical, dict(CATALOG[canonical])
        for suffix in _VARIANT_SUFFIXES:
            if key.endswith(suffix):
                key = key[: -len(suffix)]
                break
        else:
            return None
