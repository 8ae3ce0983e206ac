"""Inference: generate (batched, streaming, sampling), serve, merge and compare adapters.

The pieces it stands on live below it, shared with training: the one loader of a base model
with adapters (`lorakit.models.adapters.load_adapted`), the one decode loop
(`lorakit.generation`), the one chat renderer (`lorakit.data.chat`) and the scores
(`lorakit.evaluation`); they are re-exported here.
"""

from lorakit.data.chat import chat_prompt_ids
from lorakit.generation import Request, Sampling, generate_batch, generate_texts
from lorakit.infer.compare import Comparison, compare_adapters
from lorakit.infer.merge import MergeReport, merge_adapter
from lorakit.infer.prompting import Completion, complete, complete_prompts
from lorakit.models.adapters import load_adapted

__all__ = ["load_adapted", "complete", "chat_prompt_ids", "generate_texts", "merge_adapter", "MergeReport",
           "compare_adapters", "Comparison", "Sampling", "Request", "generate_batch", "complete_prompts",
           "Completion"]
