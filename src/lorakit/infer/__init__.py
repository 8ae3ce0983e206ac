"""Inference: load a base model with adapters, generate (batched, streaming, sampling), merge, and
compare adapters."""

from lorakit.infer.compare import Comparison, compare_adapters
from lorakit.infer.engine import Request, Sampling, generate_batch
from lorakit.infer.generate import chat_prompt_ids, complete, generate_texts, load_adapted
from lorakit.infer.merge import MergeReport, merge_adapter
from lorakit.infer.prompting import Completion, complete_prompts, load_with_adapters

__all__ = ["load_adapted", "complete", "chat_prompt_ids", "generate_texts", "merge_adapter", "MergeReport",
           "compare_adapters", "Comparison", "Sampling", "Request", "generate_batch", "complete_prompts",
           "load_with_adapters", "Completion"]
