"""How much memory LoRA training takes: an explicit model whose parts add up to the total.

    total = weights + adapter + activations + logits + allocator + overhead + distributed
            + dequantization

    weights     = base_params * b                   the frozen base model in the training dtype
                                                    (b = 4 for float32, 2 for bfloat16/float16)
                = codes + constants + unquantized   with ``quantize`` (nf4, fp4, int8): the blocks'
                                                    linear layers in 4 or 8 bits with their
                                                    quantization constants, the rest in b
                                                    (the formula: lorakit.plan.quantization)
    adapter     = trainable * (4 + 4 + 4 + 4 + a)   LoRA weights in fp32, their fp32 gradients,
                                                    AdamW's two fp32 moments, and under autocast
                                                    (a = b when b < 4, else 0) the copies of the
                                                    weights in b that backward keeps
    activations = batch * seq * per_token           bytes kept for the backward pass, per token:
      per_token = active_blocks * block + lora + int8 + final_norm           (no checkpointing)
      per_token = active_blocks * hidden * b + block + max_block_lora + int8 + final_norm
                                                    (gradient checkpointing: each block keeps its
                                                     input; one block is recomputed at a time)
        block = norms * (4 * hidden + 4)            each RMSNorm keeps its input in fp32 (2 norms;
                                                    Gemma 2/3: 4); lorakit's fused RMSNorm keeps
                                                    it in b: norms * (b * hidden + 4)
              + b * (2 * q_dim + 2 * kv_dim) + 4 * heads    attention (SDPA) keeps q, k, v, its
                                                    output and the log-sum-exp; lorakit's
                                                    attention keeps its probabilities instead of
                                                    the log-sum-exp: b * heads * keys, keys =
                                                    (h^2 + (seq - h) * seq) / seq with h = seq // 2
                                                    from 64 tokens on (about 3/4 seq), else seq
              + 4 * (q_dim + kv_dim)                q/k norms, where the model has them (fused:
                                                    b * (q_dim + kv_dim) + 4 * (heads + kv_heads))
              + heads * seq * scores_bytes          attention that keeps its scores (Gemma 2's
                                                    soft-capped eager attention: 8)
              + mlp_saved * intermediate * b        the MLP's gate, up and activation outputs
                                                    (mlp_saved = 3; 2 for GPT-2's plain MLP)
        lora  = sum over targeted modules of (c * in + c * r)   each adapter keeps the input its
                                                    A matrix reads and x·A, c bytes a value:
                                                    c = b under autocast, c = 4 without it; with
                                                    lora_dropout > 0 also a dropout mask (in c
                                                    in lorakit's fused layer, else 4 * in);
                                                    lorakit's fused layer (autocast, or fp32) casts
                                                    nothing, so without dropout modules that share
                                                    an input (q/k/v; gate/up) keep it once
        int8  = 0, or with an int8 base, per active block: b * in for each input its 8-bit
                layers read (once per shared input) that no adapter keeps as the same tensor;
                bitsandbytes keeps it on the autograd node, so checkpointing keeps it too
                (max_block_lora then adds the recomputed block's once more)
        active_blocks = blocks from the first adapted one on (earlier ones need no backward)
        final_norm    = 4 * hidden + 4 (fused: b * hidden + 4)
    logits      = min(label_positions, 1024) * vocab * (4 + b) + 2 * label_positions * hidden * b
                                                    head on label positions only, in chunks of
                                                    1,024 (lorakit's trainer on Llama-family
                                                    models): one chunk's logits in b and in fp32
                                                    at a time, the label positions' hidden states
                                                    and the gradient the loss computes as it goes
                  label_positions = ceil(batch * seq * label_fraction)
                = batch * seq * vocab * (b + 12)    head on every position (a transformers model
                                                    called with labels=): the model's output also
                                                    keeps its logits in b
    allocator   = slack * activations               what the C allocator holds beyond the live
                                                    tensors: slack = 0.35 on CPU (glibc's malloc
                                                    with its default settings; 0.64 with a
                                                    quantized base), 0 on CUDA (part of the
                                                    overhead there)
    overhead    = 0.5 GiB on CPU (Python, torch, transformers, tokenizer),
                  1.0 GiB on CUDA (context, kernels, allocator slack)
    dequantization = 0                              unquantized base; with ``quantize`` the
                                                    largest layer's weight dequantized to b, a
                                                    transient buffer (lorakit.plan.quantization)
    distributed = 0                                 one process
                                                    on several (``gpus`` = N, ``strategy`` ddp or
                                                    fsdp) every part is per device: DDP adds its
                                                    gradient buckets, FSDP2 shards weights and
                                                    adapter by N and adds the layers it gathers
                                                    (the formula: lorakit.plan.sharding)

The activation terms are the tensors PyTorch's autograd saves in transformers' blocks with LoRA
layers, counted with saved_tensors_hooks (tests/plan/test_plan_memory.py checks Llama, Qwen 2/3,
Gemma 2/3 and Phi-3 within 10%, with and without autocast; GPT-2's block, with its dropout and
tanh-GELU, is counted only roughly). Assumptions: SDPA attention without a seq x seq matrix
unless noted; AdamW over the LoRA parameters only. The defaults describe `lorakit train`: bf16
frozen weights, fp32 adapters under bf16 autocast, the output head on label positions for the
architectures in HEAD_ON_LABELS_ONLY, which also get lorakit's attention and fused RMSNorm
(``fused_kernels``). A measured peak (RSS or max_memory_allocated) is the final
check.

Measured on CPU, SmolLM2-135M with lorakit's trainer step (bf16, autocast, 2 cores):

- Live tensors: the estimate less allocator and overhead is within 2% of the peak PyTorch's
  memory profiler reports (balanced preset, batch 4 x 128: 1,026 vs 1,005 MiB).
- Peak RSS with glibc's default malloc settings, after 3 steps of one batch shape: the live
  tensors and the runtime plus 0.11-0.55 times the activations with the fused trainer step (the
  three runs of tests/plan/test_plan_peak_rss.py: conservative 4 x 256, balanced 8 x 128 with a
  third of positions unlabelled, max_capacity 4 x 256; the step before the fused layers, norms
  and attention, with many more temporaries, left 0.64-0.96). glibc keeps the freed blocks of
  one step for the next one, and its heap fragments; `allocator` takes the slack as 0.35, the
  middle of the measured range. Making glibc hand blocks back
  instead (mallopt M_MMAP_THRESHOLD = 1 MiB, M_TRIM_THRESHOLD = 0) brings peak RSS to within 3%
  of the total less `allocator`, but every step then faults its activations in afresh: 4-7x the
  page faults, and 351 -> 246 tokens/s (-30%; balanced, batch 4 x 256). malloc_trim after each
  step costs 12% (313 -> 276 tokens/s) and lowers the peak by only 8%. The trainer keeps glibc's
  defaults.
- A quantized base (``quantize``; lorakit.plan.quantization): live tensors within 6% of the
  profiler's peak (tests/plan/test_plan_quantized.py: nf4 and int8, 4 x 128 and a wide MLP at
  1 x 64). Peak RSS left more slack than an unquantized base: 0.33-0.62 times the activations with
  nf4 and 0.77-0.95 with int8 (conservative 4 x 256, balanced 8 x 128, max_capacity 4 x 256 with
  nf4; conservative and balanced with int8; the same runs unquantized left 0.15-0.26). Likely
  causes: loading frees each layer's bf16 weight once it is quantized (after loading nf4, glibc
  held 78 MiB that malloc_trim returned, against 21 MiB unquantized), and every 8-bit layer call
  allocates and frees its dequantized weight and fp32 temporaries. `allocator` takes 0.64, the
  middle of that range, with a quantized base.
- Batches of varying length make peak RSS grow over a run, whatever the malloc settings: each new
  batch shape leaves more heap fragments, and oneDNN caches kernels per shape. 80 steps of
  task-api at batch 8 (8 x 56 to 8 x 92 tokens; the step before the fused kernels) peaked at
  3,115 MiB, about 1.4 times this
  total for the longest batch. Leave room above the estimate for long runs on varied lengths.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lorakit.errors import ConfigError
from lorakit.kernels.attention import MAX_SCORES
from lorakit.kernels.attention import MIN_SPLIT as SPLIT_FROM
from lorakit.kernels.loss import DEFAULT_CHUNK as HEAD_CHUNK
from lorakit.models.family import LLAMA_FAMILY
from lorakit.plan.quantization import QUANTIZATIONS, QuantizedWeights, quantized_weights
from lorakit.plan.shapes import ModelShape, ModuleShape
from lorakit.plan.sharding import check_devices, machine_total, shard
from lorakit.plan.targets import TargetedModule

__all__ = ["MemoryEstimate", "estimate_memory", "activation_bytes_per_token", "GiB", "DTYPES",
           "OVERHEAD", "ALLOCATOR_SLACK", "ALLOCATOR_SLACK_QUANTIZED", "HEAD_ON_LABELS_ONLY"]

GiB = 1024 ** 3
DTYPES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
CANONICAL_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LOSS_FP32_COPIES = 3  # fp32 log-softmax kept by cross-entropy; in backward two fp32 gradients
# lorakit's attention skips the masked quarter of causal attention from SPLIT_FROM tokens on and
# runs up to MAX_SCORES (batch x heads x seq^2) scores per layer; the loss head works in chunks of
# HEAD_CHUNK label positions.
OVERHEAD = {"cpu": GiB // 2, "cuda": GiB}
# Bytes the C allocator holds beyond the live tensors, per byte of activations (see above).
ALLOCATOR_SLACK = {"cpu": 0.35, "cuda": 0.0}
ALLOCATOR_SLACK_QUANTIZED = {"cpu": 0.64, "cuda": 0.0}  # a quantized base (see above)
# Architectures on which lorakit's trainer runs the output head on label positions only (and its
# attention and norms): the Llama family, as the trainer decides it.
HEAD_ON_LABELS_ONLY = LLAMA_FAMILY


@dataclass(frozen=True)
class MemoryEstimate:
    """Training memory in bytes, by part; ``total`` is their sum (checked on creation)."""

    weights: int
    adapter: int
    activations: int
    logits: int
    allocator: int
    overhead: int
    distributed: int  # several processes: DDP's gradient buckets or FSDP2's gathered parameters
    dequantization: int  # a quantized base: the largest layer's weight dequantized, transient
    total: int  # per device
    budget: int | None  # the stated memory in bytes, if any (each GPU's; the machine's on cpu)
    device: str
    dtype: str
    gpus: int  # processes, one per device (one per GPU, or CPU processes on one machine)
    strategy: str  # how several processes share the model: "ddp" or "fsdp"
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    autocast: bool
    head_on_labels: bool
    label_fraction: float
    activation_bytes_per_token: int  # per_token in the formula
    quantize: str | None = None  # the base's storage: "nf4", "fp4", "int8"; None: dtype
    quantized: QuantizedWeights | None = None  # with quantize: what ``weights`` is made of

    def __post_init__(self) -> None:
        parts = (self.weights + self.adapter + self.activations + self.logits + self.allocator
                 + self.overhead + self.distributed + self.dequantization)
        assert parts == self.total, f"memory parts sum to {parts}, total says {self.total}"

    @property
    def machine_total(self) -> int:
        """What the stated memory must hold: ``total`` on CUDA (each device's); on a CPU the
        ``gpus`` processes share the machine: ``gpus * total``."""
        return machine_total(self.total, self.gpus, self.device)

    @property
    def fits(self) -> bool | None:
        """Whether `machine_total` is within the stated memory; None when none was stated."""
        return None if self.budget is None else self.machine_total <= self.budget

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights, "adapter": self.adapter,
                "activations": self.activations, "logits": self.logits,
                "allocator": self.allocator, "overhead": self.overhead,
                "distributed": self.distributed, "dequantization": self.dequantization}

    def to_dict(self) -> dict:
        return asdict(self) | {"machine_total": self.machine_total, "fits": self.fits}


def estimate_memory(shape: ModelShape, targets: list[TargetedModule], trainable: int, *,
                    lora_dropout: float = 0.0, batch_size: int = 4, seq_len: int = 512,
                    dtype: str = "bfloat16", device: str = "cpu",
                    gradient_checkpointing: bool = False, autocast: bool = True,
                    head_on_labels: bool | None = None, label_fraction: float = 1.0,
                    fused_kernels: bool | None = None, memory_gb: float | None = None,
                    gpus: int = 1, strategy: str = "ddp", use_dora: bool = False,
                    quantize: str | None = None) -> MemoryEstimate:
    """The training memory of LoRA on ``shape``, per device of ``gpus`` (see the module docstring
    for the formula); ``use_dora`` places DoRA's magnitudes in the layers FSDP2 gathers;
    ``quantize`` ("nf4", "fp4", "int8") stores the blocks' linear layers in 4 or 8 bits, computing
    in ``dtype`` (`lorakit.plan.quantization`)."""
    problems = []
    if dtype not in DTYPES:
        problems.append(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    if device not in OVERHEAD:
        problems.append(f"device={device!r}: use cpu or cuda")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.append(f"{name}={value!r}: must be a positive integer")
    if not (isinstance(label_fraction, (int, float)) and 0 < label_fraction <= 1):
        problems.append(f"label_fraction={label_fraction!r}: must be above 0 and at most 1 "
                        "(the share of positions that are prediction targets)")
    if memory_gb is not None and not memory_gb > 0:
        problems.append(f"memory_gb={memory_gb!r}: must be a positive number of GiB")
    problems += check_devices(gpus, strategy)
    if quantize is not None:
        problems += _quantize_problems(shape, quantize, gpus, strategy)
    if problems:
        raise ConfigError("cannot estimate memory: " + "; ".join(problems))
    b = DTYPES[dtype]
    tokens = batch_size * seq_len
    if head_on_labels is None:
        head_on_labels = shape.model_type in HEAD_ON_LABELS_ONLY
    if fused_kernels is None:
        fused_kernels = head_on_labels  # lorakit's trainer: its attention and norms on the same models
    per_token = activation_bytes_per_token(shape, targets, b, seq_len, lora_dropout=lora_dropout,
                                           gradient_checkpointing=gradient_checkpointing,
                                           autocast=autocast, fused_kernels=fused_kernels,
                                           batch_size=batch_size, quantize=quantize)

    sharded = shard(shape, targets, trainable, b, autocast_bytes=b if autocast and b < 4 else 0,
                    gpus=gpus, strategy=strategy, use_dora=use_dora)
    weights, adapter = sharded.weights, sharded.adapter
    quantized = None if quantize is None else quantized_weights(shape, quantize, b, device)
    if quantized is not None:  # each process holds the whole quantized base (DDP; FSDP is refused)
        weights = quantized.total
    dequantization = quantized.dequantization if quantized is not None else 0
    activations = tokens * per_token
    if head_on_labels:
        labelled = math.ceil(tokens * label_fraction)
        logits = min(labelled, HEAD_CHUNK) * shape.vocab_size * (4 + b) + 2 * labelled * shape.hidden_size * b
    else:
        logits = tokens * shape.vocab_size * (b + 4 * LOSS_FP32_COPIES)
    slack = ALLOCATOR_SLACK if quantize is None else ALLOCATOR_SLACK_QUANTIZED
    allocator = math.ceil(slack[device] * activations)
    overhead = OVERHEAD[device]
    return MemoryEstimate(
        weights=weights, adapter=adapter, activations=activations, logits=logits,
        allocator=allocator, overhead=overhead, distributed=sharded.distributed,
        dequantization=dequantization,
        total=(weights + adapter + activations + logits + allocator + overhead + sharded.distributed
               + dequantization),
        budget=None if memory_gb is None else int(memory_gb * GiB), device=device,
        dtype=CANONICAL_DTYPE.get(dtype, dtype), gpus=gpus, strategy=strategy,
        batch_size=batch_size, seq_len=seq_len,
        gradient_checkpointing=gradient_checkpointing, autocast=autocast,
        head_on_labels=head_on_labels, label_fraction=label_fraction,
        activation_bytes_per_token=per_token, quantize=quantize, quantized=quantized)


def _quantize_problems(shape: ModelShape, quantize: object, gpus: object, strategy: object) -> list[str]:
    """What is wrong with ``quantize`` here, for the estimate's one error message."""
    if quantize not in QUANTIZATIONS:
        return [f"quantize={quantize!r}: use one of {', '.join(QUANTIZATIONS)}, or None for an "
                "unquantized base"]
    problems = []
    if not any(m.kind in ("linear", "conv1d") for m in shape.block):
        problems.append(f"quantize={quantize!r}: {shape.name} has no linear layers in its blocks "
                        "to quantize; plan it without quantize")
    if strategy == "fsdp" and isinstance(gpus, int) and gpus > 1:
        problems.append(f"quantize={quantize!r} with strategy='fsdp': FSDP2 does not shard "
                        "bitsandbytes' quantized weights (lorakit train refuses it); use ddp")
    return problems


# Modules whose inputs are the same tensor (q, k and v all read the normed hidden state).
_INPUT_GROUPS = {"q_proj": "attention in", "k_proj": "attention in", "v_proj": "attention in",
                 "o_proj": "attention out", "gate_proj": "mlp in", "up_proj": "mlp in",
                 "down_proj": "mlp out"}


def activation_bytes_per_token(shape: ModelShape, targets: list[TargetedModule], b: int,
                               seq_len: int, *, lora_dropout: float = 0.0,
                               gradient_checkpointing: bool = False,
                               autocast: bool = True, fused_kernels: bool = False, batch_size: int = 1,
                               quantize: str | None = None) -> int:
    """Bytes autograd keeps per token: ``per_token`` in the module docstring."""
    h = shape.hidden_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    norm, qk_norm = 4 * h + 4, 4 * (q_dim + kv_dim)
    attention = b * (2 * q_dim + 2 * kv_dim) + 4 * shape.num_heads  # SDPA: q, k, v, output, log-sum-exp
    if fused_kernels:  # lorakit's RMSNorm, and its attention where it runs
        norm, qk_norm = b * h + 4, b * (q_dim + kv_dim) + 4 * (shape.num_heads + shape.num_kv_heads)
        if batch_size * shape.num_heads * seq_len * seq_len <= MAX_SCORES:
            half = seq_len // 2 if seq_len >= SPLIT_FROM else 0
            keys = math.ceil((half * half + (seq_len - half) * seq_len) / seq_len)
            attention = b * (2 * q_dim + 2 * kv_dim) + b * shape.num_heads * keys
            if any(len(m.roles) == 3 for m in shape.block):  # a fused qkv_proj: v pins its whole output
                attention += b * (q_dim + kv_dim)
    block = (shape.norms_per_block * norm + attention
             + (qk_norm if shape.qk_norm else 0)
             + shape.num_heads * seq_len * shape.attention_scores_bytes
             + shape.mlp_saved * shape.intermediate_size * b)
    final_norm = (b * h + 4) if fused_kernels else (4 * h + 4)
    c = b if autocast else 4  # bytes of each value an adapter keeps (its input, x·A)
    lora_by_block: dict[int | None, int] = {}
    shared: set[tuple] = set()
    fused = autocast or b == 4  # lorakit's fused layer: no cast of the input, a bool dropout mask
    for t in targets:
        layer = shape.layer_of(t.name)
        group = (layer, _input_group(t.module, t.name))
        copy = c * t.module.in_features
        if fused and lora_dropout == 0 and group in shared:
            copy = 0  # the adapters of a shared input keep that one tensor
        shared.add(group)
        mask = (c if fused else 4) * t.module.in_features if lora_dropout > 0 else 0
        lora_by_block[layer] = lora_by_block.get(layer, 0) + copy + mask + c * t.r
    layers = [i for i in lora_by_block if i is not None]
    first = 0 if None in lora_by_block and any(t.module.group == "embedding" for t in targets) \
        else min(layers, default=shape.num_layers)
    active = shape.num_layers - first
    # an 8-bit base layer keeps its input (b bytes a value) unless an adapter keeps that tensor;
    # as an attribute of its autograd node, so also through non-reentrant checkpointing
    kept_by_adapters = shared if fused and lora_dropout == 0 else set()
    int8 = ({i: _int8_inputs(shape, i, b, kept_by_adapters) for i in range(first, shape.num_layers)}
            if quantize == "int8" else {})
    lora = sum(lora_by_block.values())
    if gradient_checkpointing:
        per_block = max((v + int8.get(k, 0) for k, v in lora_by_block.items() if k is not None),
                        default=0)
        outside = lora_by_block.get(None, 0)
        return (active * h * b + (block if active else 0) + per_block + outside + final_norm
                + sum(int8.values()))
    return active * block + lora + sum(int8.values()) + final_norm


def _input_group(module: ModuleShape, name: str) -> str:
    """The input a module reads, named so that modules reading the same tensor share it."""
    return _INPUT_GROUPS.get(module.roles[0], name) if module.roles else name


def _int8_inputs(shape: ModelShape, layer: int, b: int, kept: set[tuple]) -> int:
    """Bytes per token the 8-bit linear layers of block ``layer`` keep for their backward
    (bitsandbytes' ``ctx.A``): each distinct input once, unless an adapter keeps it (``kept``)."""
    widths = {}
    for m in shape.block:
        if m.kind in ("linear", "conv1d"):
            group = (layer, _input_group(m, f"{shape.layers_prefix}.{layer}.{m.name}"))
            widths.setdefault(group, m.in_features)
    return sum(b * width for group, width in widths.items() if group not in kept)

