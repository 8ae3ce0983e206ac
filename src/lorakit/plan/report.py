"""Text a person reads: the plan table, an adapter inspection, a run diagnosis.

Each ``format_*`` function turns one of the planner's dataclasses into lines; the JSON form of
the same thing is its ``to_dict()``. Nothing here computes anything new.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit.plan.advice import TASKS, data_tier
from lorakit.plan.memory import GiB

if TYPE_CHECKING:
    from lorakit.plan.diagnose import Diagnosis
    from lorakit.plan.estimate import Estimate
    from lorakit.plan.inspection import Inspection
    from lorakit.plan.planner import Plan

__all__ = ["format_plan", "format_inspection", "format_diagnosis", "human_bytes"]

_FIELD_LABELS = {
    "r": "rank", "lora_alpha": "lora_alpha", "use_rslora": "use_rslora",
    "target_modules": "target_modules", "lora_dropout": "lora_dropout",
    "learning_rate": "learning rate", "num_epochs": "epochs", "batch_size": "batch size",
    "gradient_accumulation_steps": "grad accumulation",
    "gradient_checkpointing": "grad checkpointing",
}


def human_bytes(n: int | float) -> str:
    """1.5 KiB, 18.6 MiB, 3.20 GiB: binary units, as memory is counted."""
    if n < 1024 ** 2:
        return f"{n / 1024:.1f} KiB"
    if n < GiB:
        return f"{n / 1024 ** 2:.1f} MiB"
    return f"{n / GiB:.2f} GiB"


def _value(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float) and 0 < value < 1e-2:
        return f"{value:.0e}".replace("e-0", "e-")
    if isinstance(value, (tuple, list)):
        return ", ".join(value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def format_plan(plan: "Plan") -> str:
    shape, rec = plan.shape, plan.recommendation
    memory = rec.estimate.memory
    budget = f"{plan.memory_gb:g} GiB" if plan.memory_gb is not None else "not stated (--memory-gb)"
    lines = [
        f"Model     {shape.name}  ({shape.source})",
        f"          {shape.describe()}",
        f"          {shape.total_params:,} parameters",
        f"Task      {rec.task}: {TASKS[rec.task]}",
        f"Data      {rec.examples:,} examples ({data_tier(rec.examples)})",
        f"Training  {memory.device}, {memory.dtype}, sequences of {memory.seq_len} tokens, "
        f"memory {budget}",
        "",
        "Recommendation",
    ]
    for key, why in rec.reasons.items():
        value = _value(getattr(rec, key))
        if key == "target_modules":
            lines.append(f"  {_FIELD_LABELS[key]:<19} {value}")
            lines.append(f"  {'':<19} {why}")
        else:
            lines.append(f"  {_FIELD_LABELS[key]:<19} {value:<8} {why}")
    lines += ["", *_cost_table(plan), "", f"  {rec.estimate.peft_line()}  (recommended)"]
    return "\n".join(lines)


def _cost_table(plan: "Plan") -> list[str]:
    options = plan.options
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell) -> None:
        rows.append((label, [cell(e) for e in options.values()]))

    per_layer = plan.shape.num_layers
    row("rank / alpha", lambda e: f"{e.spec.r} / {e.spec.lora_alpha:g}" + (" rs" if e.spec.use_rslora else ""))
    row("targets per layer", lambda e: f"{len(e.targets) // per_layer} of {len(plan.shape.block)}")
    row("dropout", lambda e: f"{e.spec.lora_dropout:g}")
    row("batch x seq", lambda e: f"{e.memory.batch_size} x {e.memory.seq_len}"
        + (" ckpt" if e.memory.gradient_checkpointing else ""))
    row("trainable params", lambda e: f"{e.trainable_params:,}")
    row("share of all params", lambda e: f"{e.trainable_percent:.4f}%")
    row("adapter file fp32", lambda e: human_bytes(e.adapter_bytes_fp32))
    row("adapter file bf16", lambda e: human_bytes(e.adapter_bytes_bf16))
    row("memory: frozen weights", lambda e: human_bytes(e.memory.weights))
    row("  adapter+grads+AdamW", lambda e: human_bytes(e.memory.adapter))
    row("  activations", lambda e: human_bytes(e.memory.activations))
    row("  logits", lambda e: human_bytes(e.memory.logits))
    row("  runtime overhead", lambda e: human_bytes(e.memory.overhead))
    row("  total", lambda e: human_bytes(e.memory.total))
    if plan.memory_gb is not None:
        row(f"fits in {plan.memory_gb:g} GiB", lambda e: "yes" if e.memory.fits else "NO")
    names = list(options)
    widths = [max(len(n), *(len(cells[i]) for _, cells in rows)) for i, n in enumerate(names)]
    label_width = max(len(label) for label, _ in rows)
    out = ["  " + " " * label_width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for label, cells in rows:
        out.append("  " + label.ljust(label_width) + "  "
                   + "  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return out


def format_estimate(est: "Estimate") -> str:
    """A one-configuration summary (used by `lorakit plan` when no task is given)."""
    m = est.memory
    parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in m.parts().items())
    return "\n".join([
        est.peft_line(),
        f"adapter file: {human_bytes(est.adapter_bytes_fp32)} fp32, "
        f"{human_bytes(est.adapter_bytes_bf16)} bf16",
        f"training memory: {human_bytes(m.total)} ({parts})",
    ])
