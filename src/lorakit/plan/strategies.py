"""Which way to share a model among several processes: DDP or FSDP2, with the reason.

The recommended settings are costed per device under both strategies (`lorakit.plan.sharding`):

- DDP when everything fits each device (or no memory was stated): it is simpler and faster, since
  it exchanges only the adapter's gradients each step;
- FSDP2 when DDP does not fit and FSDP2 does: it shards the frozen weights, so a model whose
  frozen weights alone do not fit one device can still train, at the cost of gathering those
  weights in every forward and backward;
- neither: the smallest number of GPUs (a power of two, up to `MAX_GPUS`) at which FSDP2 fits,
  if there is one.

One process needs no strategy: both are the single-process estimate. A quantized base
(``quantize``) has one: DDP, since FSDP2 does not shard bitsandbytes' quantized weights (`lorakit
train` refuses ``--strategy fsdp`` with ``--quantize``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.plan.estimation import estimate
from lorakit.plan.memory import DTYPES, MemoryEstimate
from lorakit.plan.report import human_bytes
from lorakit.plan.shapes import ModelShape
from lorakit.plan.sharding import GRADIENT_BYTES, STRATEGIES, gathered_per_step

__all__ = ["StrategyAdvice", "advise_strategy", "MAX_GPUS"]

MAX_GPUS = 1024  # the most GPUs `advise_strategy` looks for when neither strategy fits


@dataclass(frozen=True)
class StrategyAdvice:
    """The recommended settings per device under each strategy, and which to use and why."""

    gpus: int
    planned: str  # the strategy the plan is costed with (--strategy)
    suggested: str | None  # "ddp" or "fsdp"; None with one process, or when neither fits
    reason: str
    per_device: dict[str, MemoryEstimate]  # "ddp", "fsdp"
    exchanged: dict[str, int]  # bytes each strategy moves per step: gradients; gathered weights
    fsdp_fits_from: int | None = None  # when neither fits: the fewest GPUs at which FSDP2 fits

    def to_dict(self) -> dict[str, Any]:
        return {"gpus": self.gpus, "planned": self.planned, "suggested": self.suggested,
                "reason": self.reason, "fsdp_fits_from": self.fsdp_fits_from,
                "exchanged_per_step": dict(self.exchanged),
                "per_device": {name: {"total": m.total, "machine_total": m.machine_total,
                                      "weights": m.weights, "adapter": m.adapter,
                                      "distributed": m.distributed, "fits": m.fits}
                               for name, m in self.per_device.items()}}


def advise_strategy(shape: ModelShape, settings: dict[str, Any], *, gpus: int = 1,
                    strategy: str = "ddp", memory_gb: float | None = None,
                    **training: Any) -> StrategyAdvice:
    """DDP or FSDP2 for the LoRA and training ``settings`` (`estimate`'s keyword arguments:
    ``r``, ``target_modules``, ``batch_size``, ...) on ``gpus`` processes; ``strategy`` is the one
    the plan was costed with, ``training`` the rest (device, dtype, seq_len)."""
    quantize = training.get("quantize")
    strategies = ("ddp",) if quantize is not None and gpus > 1 else STRATEGIES
    costed = {s: estimate(shape, **settings, **training, memory_gb=memory_gb, gpus=gpus, strategy=s)
              for s in strategies}
    ddp = costed["ddp"].memory
    exchanged = {"ddp": costed["ddp"].trainable_params * GRADIENT_BYTES if gpus > 1 else 0}
    if "fsdp" in costed:
        exchanged["fsdp"] = gathered_per_step(shape, DTYPES[ddp.dtype]) if gpus > 1 else 0
    per_device = {s: e.memory for s, e in costed.items()}
    advice = dict(gpus=gpus, planned=strategy, per_device=per_device, exchanged=exchanged)
    if gpus == 1:
        return StrategyAdvice(suggested=None, reason="one process: no strategy is needed (--gpus N "
                              "plans for N processes)", **advice)
    if "fsdp" not in costed:
        fits = ("" if ddp.fits is None else f"; it fits ({_need(ddp)})" if ddp.fits
                else f"; it does not fit {memory_gb:g} GiB ({_need(ddp)}): lower --batch-size or --seq-len")
        return StrategyAdvice(suggested="ddp", reason=(
            f"ddp: with --quantize {quantize} each process holds the whole quantized base "
            f"({human_bytes(ddp.weights)}), and FSDP2 does not shard bitsandbytes' quantized weights "
            f"(lorakit train refuses --strategy fsdp with --quantize){fits}"), **advice)
    fsdp = costed["fsdp"].memory
    traffic = (f"DDP exchanges only the adapter's gradients ({human_bytes(exchanged['ddp'])} a step), "
               f"FSDP also gathers the frozen weights in every forward and backward "
               f"({human_bytes(exchanged['fsdp'])} a step)")
    if ddp.fits is None:
        return StrategyAdvice(suggested="ddp", reason=(
            f"ddp, the simpler and faster one where the model fits each device: {traffic}; FSDP "
            f"needs {_need(fsdp)} instead of {_need(ddp)} (give --memory-gb to check what fits)"),
            **advice)
    budget = f"{memory_gb:g} GiB"
    cpu = ddp.device == "cpu"
    where, unit = ("the machine's", "process") if cpu else ("one device's", "device")
    if ddp.fits:
        return StrategyAdvice(suggested="ddp", reason=(
            f"ddp: everything fits {where} {budget} ({_need(ddp)}), and {traffic}"), **advice)
    if fsdp.fits:
        frozen = ddp.weights * (gpus if cpu else 1)
        copies = f"{gpus} copies of the frozen weights" if cpu else "the frozen weights alone"
        why = (f"{copies} ({human_bytes(frozen)}) do not fit {where} {budget}" if frozen > ddp.budget
               else f"with DDP it needs {_need(ddp)}, more than {budget}")
        return StrategyAdvice(suggested="fsdp", reason=(
            f"fsdp: {why}; FSDP shards the frozen weights ({human_bytes(fsdp.weights)} per {unit}) "
            f"and the adapter's state, and fits ({_need(fsdp)}); it gathers the frozen weights in "
            f"every forward and backward ({human_bytes(exchanged['fsdp'])} a step)"), **advice)
    fits_from = _fewest_gpus(shape, settings, gpus, memory_gb, training)
    more = (f"; FSDP fits from {fits_from} GPUs" if fits_from is not None
            else "; more processes on one machine need more of its memory, not less" if cpu
            else "; more GPUs do not make FSDP fit (activations and gathered layers stay whole)")
    return StrategyAdvice(suggested=None, fsdp_fits_from=fits_from, reason=(
        f"neither fits {budget}: DDP needs {_need(ddp)}, FSDP {_need(fsdp)}{more}; or lower "
        "--batch-size or --seq-len"), **advice)


def _need(m: MemoryEstimate) -> str:
    if m.device == "cpu" and m.gpus > 1:
        return f"{human_bytes(m.machine_total)} for {m.gpus} processes"
    return f"{human_bytes(m.total)} per device"


def _fewest_gpus(shape: ModelShape, settings: dict[str, Any], gpus: int, memory_gb: float,
                 training: dict[str, Any]) -> int | None:
    """The fewest GPUs, doubling from 2 * ``gpus``, at which FSDP2 fits ``memory_gb`` per device;
    None on a CPU (more processes on one machine need more memory in all) or when the part that
    is not sharded (activations, logits, gathered layers, runtime) alone does not fit."""
    n = 2 * gpus
    while n <= MAX_GPUS and training.get("device", "cpu") != "cpu":
        m = estimate(shape, **settings, **training, memory_gb=memory_gb, gpus=n, strategy="fsdp").memory
        if m.fits:
            return n
        if m.total - m.weights - m.adapter > m.budget:
            return None
        n *= 2
    return None
