"""Training memory per device on several processes: what DDP and FSDP2 keep on each device.

With ``gpus`` = N processes (one per GPU, or N processes of one CPU machine), each process takes
``batch_size`` examples a micro-step, as ``lorakit train --nproc N`` does, so activations, logits,
allocator slack and runtime overhead are one process's (`lorakit.plan.memory`). What changes, per
device (b: bytes per frozen value; a = b under autocast with b < 4, else 0):

    ddp   weights     = base_params * b                   every device holds the whole frozen model
          adapter     = trainable * (16 + a)              the adapter, its gradients, AdamW's moments
          distributed = trainable * 4                     DDP's gradient buckets: a second fp32 copy
                                                          of the gradients, all-reduced in backward
    fsdp  weights     = ceil(base_params * b / N)         FSDP2 (`fully_shard` per decoder layer and
          adapter     = ceil(trainable * 16 / N)          at the root) shards the frozen weights, the
                        + trainable * a                   adapter, its gradients and AdamW's moments;
                                                          the autocast copies are made from the
                                                          gathered weights and kept whole for backward
          distributed = 2 * layer + root                  the unsharded buffers FSDP2 gathers into:
            layer = block_params * b + 4 * layer_lora     the largest decoder layer, whole: one
                                                          computing, the next one prefetched
            root  = (embedding + head, unless tied,      the root's parameters, gathered through
                     + final norm and positions) * b      the forward and the backward
                    + 4 * root_lora

One process (N = 1) is the single-process estimate, whatever the strategy: distributed = 0.
The FSDP2 terms are approximate: each parameter is padded to a multiple of N when sharded, and a
layer's unsharded adapter gradients live briefly before they are reduce-scattered.

On a CPU the N processes share one machine's memory: the machine needs N times each process's
total (`machine_total`), which is what ``--memory-gb`` is checked against there; on CUDA each
device's total is checked against it.

Per step, DDP all-reduces the adapter's gradients (trainable * 4 bytes); FSDP2 all-gathers every
decoder layer's frozen weights in the forward and again in the backward, and the root's once
(`gathered_per_step`), then reduce-scatters the adapter's gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from lorakit.checks import STRATEGIES
from lorakit.errors import ConfigError
from lorakit.plan.shapes import ModelShape
from lorakit.plan.targets import TargetedModule

__all__ = ["STRATEGIES", "Sharded", "shard", "check_devices", "gathered_per_step", "machine_total"]

ADAPTER_STATE_BYTES = 4 + 4 + 4 + 4  # fp32 weight, gradient, AdamW exp_avg, exp_avg_sq
GRADIENT_BYTES = 4  # fp32 adapter gradients
ADAPTER_BYTES = 4  # fp32 adapter weights


@dataclass(frozen=True)
class Sharded:
    """The parts of the estimate that depend on the processes, per device, in bytes."""

    weights: int
    adapter: int
    distributed: int


def check_devices(gpus: object, strategy: object) -> list[str]:
    """The problems with ``gpus`` and ``strategy``, for the estimate's one error message."""
    problems = []
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        problems.append(f"gpus={gpus!r}: must be a positive number of processes (one per GPU, "
                        "or CPU processes); 1 for one process")
    if strategy not in STRATEGIES:
        problems.append(f"strategy={strategy!r}: use {' or '.join(STRATEGIES)}")
    return problems


def shard(shape: ModelShape, targets: Iterable[TargetedModule], trainable: int, b: int, *,
          autocast_bytes: int, gpus: int = 1, strategy: str = "ddp",
          use_dora: bool = False) -> Sharded:
    """Frozen weights, adapter state and the strategy's buffers on one of ``gpus`` devices: the
    module docstring's formula. ``autocast_bytes`` is ``a`` there (the adapter's autocast copies)."""
    weights = shape.total_params * b
    adapter = trainable * (ADAPTER_STATE_BYTES + autocast_bytes)
    if gpus == 1:
        return Sharded(weights=weights, adapter=adapter, distributed=0)
    if strategy == "ddp":
        return Sharded(weights=weights, adapter=adapter, distributed=trainable * GRADIENT_BYTES)
    layer_lora, root_lora = _adapter_params_by_place(shape, targets, use_dora)
    layer = shape.block_params * b + ADAPTER_BYTES * max(layer_lora.values(), default=0)
    return Sharded(
        weights=math.ceil(weights / gpus),
        adapter=math.ceil(trainable * ADAPTER_STATE_BYTES / gpus) + trainable * autocast_bytes,
        distributed=min(2, shape.num_layers) * layer + _root_params(shape) * b + ADAPTER_BYTES * root_lora)


def gathered_per_step(shape: ModelShape, b: int) -> int:
    """Bytes of frozen weights FSDP2 all-gathers a step: every decoder layer in the forward and
    again in the backward, the root once (each device receives all but its own 1/N of them)."""
    return 2 * shape.num_layers * shape.block_params * b + _root_params(shape) * b


def machine_total(total: int, gpus: int, device: str) -> int:
    """What the memory must hold: one device's total on CUDA; on a CPU the ``gpus`` processes
    share the machine, so ``gpus`` times a process's total."""
    return total * gpus if device == "cpu" else total


def _root_params(shape: ModelShape) -> int:
    """Frozen parameters outside the decoder layers: embedding, untied head, final norm, positions."""
    return shape.total_params - shape.num_layers * shape.block_params


def _adapter_params_by_place(shape: ModelShape, targets: Iterable[TargetedModule],
                             use_dora: bool) -> tuple[dict[int, int], int]:
    """Adapter parameters per decoder layer index, and those outside the layers (the root's)."""
    by_layer: dict[int, int] = {}
    root = 0
    for t in targets:
        index = shape.layer_of(t.name)
        if index is None:
            root += t.params(use_dora)
        else:
            by_layer[index] = by_layer.get(index, 0) + t.params(use_dora)
    return by_layer, root
