"""Generation: the one entry to decoding (`generate_batch`) and greedy texts on top of it.

Every command that generates goes through `engine.generate_batch`: `lorakit generate`, the
server, and the task scores of training, `lorakit eval` and `lorakit compare`. On a
Llama-family model it runs on the fast decoder (`decoder`, `weights`: packed weights and a static
KV cache) through `batcher` (continuous batching, which `lorakit serve` drives directly); other
models run the model's own forward. `sampling` holds what a request is and how a row picks a token. The package sits
beside `data` and `models`, under `evaluation` (which scores by generating) and the jobs; it
needs only torch and the core (mixed-adapter batches), never a tokenizer's class: a tokenizer
is read for its EOS and padding ids and, in `texts`, to decode.
"""

from lorakit.generation.engine import (BASE, Request, Sampling, eos_token_ids, finish_reason, generate_batch,
                                       left_pad, row_ended, warp_logits)
from lorakit.generation.texts import generate_texts, line_break_ids

__all__ = ["Sampling", "Request", "generate_batch", "warp_logits", "eos_token_ids", "row_ended", "finish_reason",
           "left_pad", "BASE", "generate_texts", "line_break_ids"]
