"""Inference: load a base model with an adapter, and generate."""

from lorakit.infer.generate import chat_prompt_ids, complete, generate_texts, load_adapted

__all__ = ["load_adapted", "complete", "chat_prompt_ids", "generate_texts"]
