"""How much memory LoRA training takes: an explicit model whose parts add up to the total.

    total = weights + adapter + activations + logits + overhead

    weights     = base_params * b                   the frozen base model in the training dtype
                                                    (b = 4 for float32, 2 for bfloat16/float16)
    adapter     = trainable * (4 + 4 + 4 + 4)       LoRA weights in fp32, their fp32 gradients and
                                                    AdamW's two fp32 moments
    activations = batch * seq * per_token           bytes kept for the backward pass, per token:
      per_token = active_blocks * block + lora + final_norm                  (no checkpointing)
      per_token = active_blocks * hidden * b + block + max_block_lora + final_norm
                                                    (gradient checkpointing: each block keeps its
                                                     input; one block is recomputed at a time)
        block = norms * (4 * hidden + 4)            each RMSNorm keeps its input in fp32 (2 norms;
                                                    Gemma 2/3: 4)
              + b * (2 * q_dim + 2 * kv_dim) + 4 * heads    attention (SDPA) keeps q, k, v, its
                                                    output and the log-sum-exp
              + 4 * (q_dim + kv_dim)                q/k norms, where the model has them
              + heads * seq * scores_bytes          attention that keeps its scores (Gemma 2's
                                                    soft-capped eager attention: 8)
              + mlp_saved * intermediate * b        the MLP's gate, up and activation outputs
                                                    (mlp_saved = 3; 2 for GPT-2's plain MLP)
        lora  = sum over targeted modules of (4 * in + 4 * r)   each adapter casts its input to
                                                    fp32 and keeps it, and keeps x·A; with
                                                    lora_dropout > 0 also a 4 * in dropout mask
                                                    (in float32 training, modules that share an
                                                    input, like q/k/v, keep it once)
        active_blocks = blocks from the first adapted one on (earlier ones need no backward)
        final_norm    = 4 * hidden + 4
    logits      = batch * seq * vocab * (b + 12)    the logits in the training dtype, the fp32
                                                    log-softmax that cross-entropy keeps, and in
                                                    backward its gradient and the logits' (fp32)
    overhead    = 0.5 GiB on CPU (Python, torch, transformers, tokenizer),
                  1.0 GiB on CUDA (context, kernels, allocator slack)

The activation terms are the tensors PyTorch's autograd saves in transformers' blocks with LoRA
layers, counted with saved_tensors_hooks (tests/plan/test_plan_memory.py checks Llama, Qwen 2/3,
Gemma 2/3 and Phi-3 within 10%; GPT-2's block, with its dropout and tanh-GELU, is counted only
roughly). Assumptions: SDPA attention without a seq x seq matrix unless noted; AdamW over the
LoRA parameters only. A measured peak (RSS or max_memory_allocated) is the final check.

Measured on CPU (SmolLM2-135M shapes, PEFT, batch 2-4 x 256-512, bf16 and fp32, with and without
checkpointing): the estimate less the overhead is 1-5% above the live-tensor peak that PyTorch's
memory profiler reports, and the total is within 4% of peak RSS when the C allocator hands large
freed blocks back (glibc: mallopt M_MMAP_THRESHOLD = 1 MiB, M_TRIM_THRESHOLD = 0). With glibc's
defaults, freed activations stay in the process and peak RSS runs 25-50% above the estimate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lorakit.errors import ConfigError
from lorakit.plan.shapes import ModelShape
from lorakit.plan.targets import TargetedModule

__all__ = ["MemoryEstimate", "estimate_memory", "activation_bytes_per_token", "GiB", "DTYPES",
           "OVERHEAD"]

GiB = 1024 ** 3
DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ADAPTER_BYTES_PER_PARAM = 4 + 4 + 4 + 4  # fp32 weight, gradient, AdamW exp_avg, exp_avg_sq
LOSS_FP32_COPIES = 3  # fp32 log-softmax kept by cross-entropy; in backward two fp32 gradients
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
    activation_bytes_per_token: int  # per_token in the formula

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
    per_token = activation_bytes_per_token(shape, targets, b, seq_len, lora_dropout=lora_dropout,
                                           gradient_checkpointing=gradient_checkpointing)

    weights = shape.total_params * b
    adapter = trainable * ADAPTER_BYTES_PER_PARAM
    activations = tokens * per_token
    logits = tokens * shape.vocab_size * (b + 4 * LOSS_FP32_COPIES)
    overhead = OVERHEAD[device]
    return MemoryEstimate(
        weights=weights, adapter=adapter, activations=activations, logits=logits,
        overhead=overhead, total=weights + adapter + activations + logits + overhead,
        budget=None if memory_gb is None else int(memory_gb * GiB), device=device,
        dtype=CANONICAL_DTYPE.get(dtype, dtype), batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, activation_bytes_per_token=per_token)


# Modules whose inputs are the same tensor (q, k and v all read the normed hidden state).
_INPUT_GROUPS = {"q_proj": "attention in", "k_proj": "attention in", "v_proj": "attention in",
                 "o_proj": "attention out", "gate_proj": "mlp in", "up_proj": "mlp in",
                 "down_proj": "mlp out"}


def activation_bytes_per_token(shape: ModelShape, targets: list[TargetedModule], b: int,
                               seq_len: int, *, lora_dropout: float = 0.0,
                               gradient_checkpointing: bool = False) -> int:
    """Bytes autograd keeps per token: ``per_token`` in the module docstring."""
    h = shape.hidden_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    block = (shape.norms_per_block * (4 * h + 4)
             + b * (2 * q_dim + 2 * kv_dim) + 4 * shape.num_heads
             + (4 * (q_dim + kv_dim) if shape.qk_norm else 0)
             + shape.num_heads * seq_len * shape.attention_scores_bytes
             + shape.mlp_saved * shape.intermediate_size * b)
    final_norm = 4 * h + 4
    lora_by_block: dict[int | None, int] = {}
    shared: set[tuple] = set()
    for t in targets:
        layer = _block_index(shape, t.name)
        group = (layer, _INPUT_GROUPS.get(t.module.roles[0], t.name) if t.module.roles else t.name)
        copy = 4 * t.module.in_features
        if b == 4 and group in shared:
            copy = 0  # float32 training: the cast is a no-op, the shared input is kept once
        shared.add(group)
        mask = 4 * t.module.in_features if lora_dropout > 0 else 0
        lora_by_block[layer] = lora_by_block.get(layer, 0) + copy + mask + 4 * t.r
    layers = [i for i in lora_by_block if i is not None]
    first = 0 if None in lora_by_block and any(t.module.group == "embedding" for t in targets) \
        else min(layers, default=shape.num_layers)
    active = shape.num_layers - first
    lora = sum(lora_by_block.values())
    if gradient_checkpointing:
        per_block = max((v for k, v in lora_by_block.items() if k is not None), default=0)
        outside = lora_by_block.get(None, 0)
        return active * h * b + (block if active else 0) + per_block + outside + final_norm
    return active * block + lora + final_norm


def _block_index(shape: ModelShape, name: str) -> int | None:
    prefix = shape.layers_prefix + "."
    if not name.startswith(prefix):
        return None
    return int(name[len(prefix):].split(".", 1)[0])
