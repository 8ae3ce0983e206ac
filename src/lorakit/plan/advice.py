"""What to choose: rank, alpha, targets, dropout, learning rate, epochs and batch, each with why.

The rules are the LoRA lesson's selection framework:

    Q: How different is the target behaviour from the base model?
       just formatting -> rank 8;  a new domain -> rank 16-32;  new capabilities -> rank 64+
    Q: How much training data?
       < 500 examples -> a lower rank (avoid overfitting), light dropout (0.05)
       500-2,000      -> rank 16 is safe
       > 2,000        -> a higher rank is justified

combined in `RANK_TABLE`; alpha = rank (scale 1.0); rsLoRA from rank 64; attention-only targets
for format tasks, all seven projections otherwise; and, when a memory budget is given and the
plan does not fit, gradient checkpointing, then a smaller batch, then fewer targets.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lorakit.errors import ConfigError
from lorakit.plan.estimation import Estimate, estimate
from lorakit.plan.memory import GiB
from lorakit.plan.shapes import ModelShape

__all__ = ["Recommendation", "recommend", "RANK_TABLE", "TASKS", "data_tier"]

TASKS = {
    "format": "the output format or style changes; the knowledge is already in the model",
    "domain": "a new domain: vocabulary, facts and conventions the model has seen little of",
    "behavior": "a new behaviour or capability the base model does not have",
}
_ALIASES = {"behaviour": "behavior", "style": "format", "formatting": "format"}

# (task, data tier) -> rank: the task sets the range, the data size picks within it (or below).
RANK_TABLE = {
    ("format", "small"): 8, ("format", "medium"): 8, ("format", "large"): 8,
    ("domain", "small"): 8, ("domain", "medium"): 16, ("domain", "large"): 32,
    ("behavior", "small"): 16, ("behavior", "medium"): 32, ("behavior", "large"): 64,
}
_TASK_RANGE = {"format": "8", "domain": "16-32", "behavior": "64+"}
_TIER_TEXT = {"small": "under 500 examples", "medium": "500-2,000 examples",
              "large": "over 2,000 examples"}
RSLORA_FROM_RANK = 64
RSLORA_ALPHA = 16
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_SEVEN = ATTENTION + ("gate_proj", "up_proj", "down_proj")
MINIMAL = ("q_proj", "v_proj")


def data_tier(examples: int) -> str:
    """The lesson's data-size bands: small (< 500), medium (500-2,000), large (> 2,000)."""
    return "small" if examples < 500 else "medium" if examples <= 2000 else "large"


@dataclass(frozen=True)
class Recommendation:
    """The advised LoRA and training settings, a reason for each, and what they cost."""

    task: str
    examples: int
    r: int
    lora_alpha: float
    use_rslora: bool
    target_modules: tuple[str, ...]
    lora_dropout: float
    learning_rate: float
    num_epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    reasons: dict[str, str] = field(compare=False)  # why, for each field above from "r" on
    estimate: Estimate = field(compare=False, repr=False)

    def lora_config(self) -> dict[str, Any]:
        """Arguments for ``LoraConfig(**...)`` (lorakit's or PEFT's)."""
        return dict(r=self.r, lora_alpha=self.lora_alpha, target_modules=list(self.target_modules),
                    lora_dropout=self.lora_dropout, use_rslora=self.use_rslora)

    def train_args(self) -> list[str]:
        """The `lorakit train` flags that train this recommendation (rsLoRA included; with
        several processes ``--nproc`` and ``--strategy``)."""
        args = ["--r", str(self.r), "--lora-alpha", f"{self.lora_alpha:g}", "--lora-dropout", f"{self.lora_dropout:g}",
                "--target-modules", *self.target_modules, "--lr", f"{self.learning_rate:g}",
                "--epochs", str(self.num_epochs), "--batch-size", str(self.batch_size),
                "--grad-accum", str(self.gradient_accumulation_steps)]
        if self.use_rslora:
            args.append("--use-rslora")
        if self.gradient_checkpointing:
            args.append("--gradient-checkpointing")
        memory = self.estimate.memory
        if memory.quantize is not None:
            args += ["--quantize", memory.quantize]
        if memory.gpus > 1:
            args += ["--nproc", str(memory.gpus), "--strategy", memory.strategy]
        return args

    def to_dict(self) -> dict[str, Any]:
        settings = {k: getattr(self, k) for k in self.reasons}
        settings["target_modules"] = list(self.target_modules)
        return {"task": self.task, "examples": self.examples, "settings": settings,
                "reasons": dict(self.reasons), "estimate": self.estimate.to_dict(),
                "train_args": self.train_args()}


def recommend(task: str, examples: int, shape: ModelShape, memory_gb: float | None = None, *,
              device: str = "cpu", dtype: str = "bfloat16", seq_len: int = 512,
              batch_size: int = 4, gpus: int = 1, strategy: str = "ddp",
              quantize: str | None = None) -> Recommendation:
    """The lesson's advice for ``task`` with ``examples`` training examples on ``shape``.

    ``task``: "format", "domain" or "behavior" (see `TASKS`). A pure function: the same inputs
    give the same advice; ``memory_gb`` (GiB) narrows the batch and targets until the estimate
    fits, or says it cannot. ``gpus`` processes with ``strategy`` ("ddp" or "fsdp"): the estimate
    is per device and ``batch_size`` per process, as in ``lorakit train --nproc``. ``quantize``
    ("nf4", "fp4", "int8"): the frozen base in 4 or 8 bits, as ``lorakit train --quantize``.
    """
    task = _check(task, examples)
    tier = data_tier(examples)
    reasons: dict[str, str] = {}

    r = RANK_TABLE[(task, tier)]
    reasons["r"] = _rank_reason(task, tier, r)
    use_rslora = r >= RSLORA_FROM_RANK
    if use_rslora:
        alpha = RSLORA_ALPHA
        reasons["lora_alpha"] = (f"with rsLoRA the scale is alpha/sqrt(r) = "
                                 f"{alpha / math.sqrt(r):g}; alpha = rank would give "
                                 f"{r / math.sqrt(r):g}, too strong")
        reasons["use_rslora"] = (f"from rank {RSLORA_FROM_RANK} rsLoRA's alpha/sqrt(r) scaling "
                                 "keeps a high rank learning stably (Kalajdzievski 2023)")
    else:
        alpha = r
        reasons["lora_alpha"] = "alpha = rank: scale 1.0, the lesson's default"
        reasons["use_rslora"] = f"plain alpha/r scaling is fine below rank {RSLORA_FROM_RANK}"

    roles = MINIMAL if task == "format" else ALL_SEVEN
    targets_why = ("attention only (q, v): enough for format and style changes" if task == "format"
                   else "attention and MLP: a new domain or behaviour needs the MLP's capacity")

    if tier == "small":
        dropout = 0.05
        reasons["lora_dropout"] = f"light regularisation: {_TIER_TEXT[tier]} overfit easily"
    else:
        dropout = 0.0
        reasons["lora_dropout"] = "with 500+ examples no dropout works well (Unsloth's default)"

    lr = 1e-4 if r >= RSLORA_FROM_RANK or shape.total_params > 30e9 else 2e-4
    reasons["learning_rate"] = (
        "LoRA's usual 2e-4, halved for a high rank" if r >= RSLORA_FROM_RANK
        else "LoRA's usual 2e-4, halved for a model over 30B" if lr < 2e-4
        else "LoRA's usual rate (about 10x full fine-tuning's)")
    epochs = {"small": 3, "medium": 2, "large": 1}[tier]
    reasons["num_epochs"] = (
        f"{_TIER_TEXT[tier]}: " +
        {"small": "several passes are needed, so check held-out loss each epoch (lorakit diagnose)",
         "medium": "two passes usually suffice; more starts to memorise",
         "large": "one pass over this much data is usually enough"}[tier])

    fitted = _fit(shape, roles, dict(r=r, lora_alpha=alpha, use_rslora=use_rslora,
                                     lora_dropout=dropout), memory_gb, batch_size,
                  dict(device=device, dtype=dtype, seq_len=seq_len, gpus=gpus, strategy=strategy,
                       quantize=quantize))
    est, batch, accumulation, checkpointing, roles, memory_why = fitted
    targets = tuple(shape.target_names(roles))
    reasons["target_modules"] = targets_why + memory_why.get("targets", "")
    reasons["batch_size"] = memory_why["batch"]
    reasons["gradient_accumulation_steps"] = (
        f"keeps the effective batch at {batch * accumulation}" if accumulation > 1
        else "the batch is not split")
    reasons["gradient_checkpointing"] = memory_why.get(
        "checkpointing", "not needed to fit; it costs about a third more compute")
    return Recommendation(
        task=task, examples=examples, r=r, lora_alpha=alpha, use_rslora=use_rslora,
        target_modules=targets, lora_dropout=dropout, learning_rate=lr, num_epochs=epochs,
        batch_size=batch, gradient_accumulation_steps=accumulation,
        gradient_checkpointing=checkpointing, reasons=reasons, estimate=est)


def _check(task: str, examples: int) -> str:
    task = _ALIASES.get(str(task).lower(), str(task).lower())
    problems = []
    if task not in TASKS:
        problems.append(f"task={task!r}: choose format, domain or behavior")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples <= 0:
        problems.append(f"examples={examples!r}: the number of training examples, a positive integer")
    if problems:
        raise ConfigError("cannot recommend: " + "; ".join(problems))
    return task


def _rank_reason(task: str, tier: str, r: int) -> str:
    task_range = _TASK_RANGE[task]
    why = {"small": "fewer than 500 examples call for a lower rank to avoid overfitting",
           "medium": "with 500-2,000 examples rank 16 is safe",
           "large": "over 2,000 examples justify a higher rank"}[tier]
    kind = {"format": "a format change", "domain": "a new domain", "behavior": "a new behaviour"}[task]
    return f"{kind} takes rank {task_range}; {why}"


def _fit(shape, roles, lora, memory_gb, batch_size, training):
    """Estimate; if it does not fit memory_gb: checkpointing, then halve the batch, then narrow."""
    why: dict[str, str] = {}
    checkpointing, batch = False, batch_size

    def run():
        return estimate(shape, target_modules=shape.target_names(roles), batch_size=batch,
                        gradient_checkpointing=checkpointing, memory_gb=memory_gb, **lora, **training)

    est = run()
    if est.memory.fits is not False:
        why["batch"] = (f"as asked; the plan fits {memory_gb:g} GiB" if memory_gb is not None
                        else "as asked (give --memory-gb to check that it fits)")
        return est, batch, 1, checkpointing, roles, why
    budget = f"{memory_gb:g} GiB"
    checkpointing = True
    why["checkpointing"] = f"without it the plan needs more than {budget}"
    est = run()
    why["batch"] = f"as asked; fits {budget} with gradient checkpointing"
    while est.memory.fits is False and batch > 1:
        batch //= 2
        why["batch"] = f"lowered from {batch_size} to fit {budget}"
        est = run()
    wanted = roles
    for narrower, what in ((ATTENTION, "attention only"), (MINIMAL, "q and v only")):
        if est.memory.fits is not False or set(narrower) >= set(roles):
            continue
        roles = narrower
        why["targets"] = f"; narrowed to {what} to fit {budget}"
        est = run()
    if est.memory.fits is False:
        if roles != wanted:  # narrowing did not make it fit: keep the capacity the task needs
            roles = wanted
            why.pop("targets")
            est = run()
        m = est.memory
        why["batch"] = ("as asked" if batch == batch_size else why["batch"].split(" to fit")[0]) + (
            f"; still needs {m.machine_total / GiB:.1f} GiB of {budget} (frozen weights alone "
            f"{m.weights / GiB:.1f} GiB): use a smaller model, more memory or a shorter --seq-len")
    accumulation = max(1, math.ceil(batch_size / batch))
    return est, batch, accumulation, checkpointing, roles, why
