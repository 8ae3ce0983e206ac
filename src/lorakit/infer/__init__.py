"""Inference: load a base model with an adapter, generate, merge, and compare adapters."""

from lorakit.infer.compare import Comparison, compare_adapters
from lorakit.infer.generate import chat_prompt_ids, complete, generate_texts, load_adapted
from lorakit.infer.merge import MergeReport, merge_adapter

__all__ = ["load_adapted", "complete", "chat_prompt_ids", "generate_texts", "merge_adapter", "MergeReport",
           "compare_adapters", "Comparison"]
