"""How much memory LoRA training takes: an explicit model whose parts add up to the total.

    total = weights + adapter + activations + logits + overhead

    weights     = base_params * b                    the frozen base model in the training dtype
                                                     (b = 4 for float32, 2 for bfloat16/float16)
    adapter     = trainable * (4 + 4 + 4 + 4)        LoRA weights in fp32, their fp32 gradients
                                                     and AdamW's two fp32 moments
    activations = batch * seq * b * per_token        values kept for the backward pass:
        per_token = layers * block                           (no checkpointing)
        per_token = layers * hidden + block                  (gradient checkpointing: each block's
                                                              input is kept, one block is recomputed
                                                              at a time)
        block = sum over the block's projections of (in + out)   their inputs and outputs
              + 4 * hidden                                       the two norms' inputs and outputs
              + (sum over targeted modules of r, and of in when lora_dropout > 0) / layers
                                                     LoRA's x·A, and the dropped-out copy of x
    logits      = batch * seq * vocab * (b + 4 + 4)  the logits, their fp32 copy and the fp32
                                                     log-softmax that cross-entropy keeps
    overhead    = 0.5 GiB on CPU (Python, torch, transformers, tokenizer),
                  1.0 GiB on CUDA (context, kernels, allocator slack)

Assumptions: attention runs without a seq x seq matrix (PyTorch SDPA / flash); the optimizer is
AdamW over the LoRA parameters only. A measured peak (RSS or max_memory_allocated) is the check.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lorakit.errors import ConfigError
from lorakit.plan.shapes import ModelShape
from lorakit.plan.targets import TargetedModule

__all__ = ["MemoryEstimate", "estimate_memory", "GiB", "DTYPES", "OVERHEAD"]

GiB = 1024 ** 3
DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ADAPTER_BYTES_PER_PARAM = 4 + 4 + 4 + 4  # fp32 weight, gradient, AdamW exp_avg, exp_avg_sq
LOSS_FP32_COPIES = 2  # fp32 logits and fp32 log-softmax saved by cross-entropy
OVERHEAD = {"cpu": GiB // 2, "cuda": GiB}


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory in bytes, by part; ``total`` is their sum (checked on creation)."""

    weights: int
    adapter: int
    activations: int
    logits: int
    overhead: int
    total: int
    budget: int | None  # the stated memory in bytes, if any
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    activation_values_per_token: int  # per_token in the formula

    def __post_init__(self) -> None:
        parts = self.weights + self.adapter + self.activations + self.logits + self.overhead
        assert parts == self.total, f"memory parts sum to {parts}, total says {self.total}"

    @property
    def fits(self) -> bool | None:
        """Whether the total is within the stated memory; None when none was stated."""
        return None if self.budget is None else self.total <= self.budget

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "adapter": self.adapter,
                "activations": self.activations, "logits": self.logits,
                "overhead": self.overhead}

    def to_dict(self) -> dict:
        return asdict(self) | {"fits": self.fits}


def estimate_memory(shape: ModelShape, targets: list[TargetedModule], trainable: int, *,
                    lora_dropout: float = 0.0, batch_size: int = 4, seq_len: int = 512,
                    dtype: str = "bfloat16", device: str = "cpu",
                    gradient_checkpointing: bool = False,
                    memory_gb: float | None = None) -> MemoryEstimate:
    """The training memory of LoRA on ``shape``: see the module docstring for the formula."""
    problems = []
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if device not in OVERHEAD:
        problems.append(f"device={device!r}: use cpu or cuda")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(f"{name}={value!r}: must be a positive integer")
    if memory_gb is not None and not memory_gb > 0:
        problems.append(f"memory_gb={memory_gb!r}: must be a positive number of GiB")
    if problems:
        raise ConfigError("cannot estimate memory: " + "; ".join(problems))
    b = DTYPES[dtype]
    tokens = batch_size * seq_len

    block = sum(m.in_features + m.out_features for m in shape.block) + 4 * shape.hidden_size
    lora = sum(t.r + (t.module.in_features if lora_dropout > 0 else 0) for t in targets)
    if gradient_checkpointing:
        per_token = shape.num_layers * shape.hidden_size + block + lora // shape.num_layers
    else:
        per_token = shape.num_layers * block + lora

    weights = shape.total_params * b
    adapter = trainable * ADAPTER_BYTES_PER_PARAM
    activations = tokens * b * per_token
    logits = tokens * shape.vocab_size * (b + 4 * LOSS_FP32_COPIES)
    overhead = OVERHEAD[device]
    return MemoryEstimate(
        weights=weights, adapter=adapter, activations=activations, logits=logits,
        overhead=overhead, total=weights + adapter + activations + logits + overhead,
        budget=None if memory_gb is None else int(memory_gb * GiB), device=device,
        dtype=CANONICAL_DTYPE.get(dtype, dtype), batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, activation_values_per_token=per_token)
