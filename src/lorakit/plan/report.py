"""Text a person reads: the plan table, an adapter inspection, a run diagnosis.

Each ``format_*`` function turns one of the planner's dataclasses into lines; the JSON form of
the same thing is its ``to_dict()``. Nothing here computes anything new.
"""

from __future__ import annotations

import math
import textwrap
from typing import TYPE_CHECKING

from lorakit.plan.advice import TASKS, data_tier
from lorakit.plan.memory import GiB
from lorakit.plan.quantization import DESCRIPTION

if TYPE_CHECKING:
    from lorakit.plan.diagnosis import Diagnosis
    from lorakit.plan.estimation import Estimate
    from lorakit.plan.memory import MemoryEstimate
    from lorakit.plan.inspection import Inspection
    from lorakit.plan.planner import Plan
    from lorakit.plan.strategies import StrategyAdvice

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
        f"Training  {memory.device}, {memory.dtype}"
        + (f", base quantized to {memory.quantize}" if memory.quantize else "")
        + f", sequences of {memory.seq_len} tokens, memory {budget}",
        *_processes_line(memory),
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
    lines += ["", *_cost_table(plan),
              "  (rs = rsLoRA, ckpt = gradient checkpointing; memory formula: lorakit.plan.memory"
              + ("; quantized base: lorakit.plan.quantization)" if memory.quantize else ")"),
              *_strategy_lines(plan.strategy),
              "", f"  recommended: {rec.estimate.peft_line()}",
              f"  train it:    lorakit train --data YOUR.jsonl {' '.join(rec.train_args())}"]
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
    first = plan.recommendation.estimate.memory
    several = first.gpus > 1
    unit = "process" if first.device == "cpu" else "device"
    frozen = "frozen weights"
    if first.quantize:
        frozen += f" ({first.quantize}, {DESCRIPTION[first.quantize]})"
    row(f"per {unit}: {frozen}" if several else f"memory: {frozen}",
        lambda e: human_bytes(e.memory.weights))
    if first.quantized is not None:
        bits = "4 bits" if first.quantize in ("nf4", "fp4") else "8 bits"
        row(f"    {first.quantize} codes, {bits} a weight", lambda e: human_bytes(e.memory.quantized.codes))
        row("    quantization constants" if first.quantize != "int8" else "    row scales (fp32)",
            lambda e: human_bytes(e.memory.quantized.constants))
        row(f"    embedding, norms, head ({first.dtype})",
            lambda e: human_bytes(e.memory.quantized.unquantized))
    row("  adapter+grads+AdamW", lambda e: human_bytes(e.memory.adapter))
    row("  activations", lambda e: human_bytes(e.memory.activations))
    row("  logits", lambda e: human_bytes(e.memory.logits))
    if first.quantized is not None:
        row(f"  dequantization buffer ({first.dtype})", lambda e: human_bytes(e.memory.dequantization))
    row("  allocator slack", lambda e: human_bytes(e.memory.allocator))
    row("  runtime overhead", lambda e: human_bytes(e.memory.overhead))
    if several:
        row(f"  {_DISTRIBUTED_LABEL[first.strategy]}", lambda e: human_bytes(e.memory.distributed))
    row("  total", lambda e: human_bytes(e.memory.total))
    if several and first.device == "cpu":
        row(f"all {first.gpus} processes", lambda e: human_bytes(e.memory.machine_total))
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


_DISTRIBUTED_LABEL = {"ddp": "DDP grad buckets", "fsdp": "FSDP gathered params"}


def _processes_line(memory: "MemoryEstimate") -> list[str]:
    if memory.gpus == 1:
        return []
    if memory.device == "cpu":
        return [f"          {memory.gpus} CPU processes sharing the machine's memory, --strategy "
                f"{memory.strategy}; memory below per process, batch {memory.batch_size} each"]
    return [f"          {memory.gpus} processes (one per GPU), --strategy {memory.strategy}; memory "
            f"below per device, batch {memory.batch_size} each"]


def _strategy_lines(advice: "StrategyAdvice") -> list[str]:
    """Both strategies' memory for the recommendation, and which to use (several processes)."""
    if advice.gpus == 1:
        return []
    moved = {"ddp": "all-reduces {} of adapter gradients a step",
             "fsdp": "gathers {} of frozen weights a step"}
    lines = ["", f"Strategy  {advice.gpus} processes, the recommended settings under each"]
    for name, m in advice.per_device.items():
        need = (f"{human_bytes(m.machine_total)} in all" if m.device == "cpu"
                else f"{human_bytes(m.total)} per device")
        fits = "" if m.fits is None else ("  fits        " if m.fits else "  does not fit")
        traffic = moved[name].format(human_bytes(advice.exchanged[name]))
        lines.append(f"  {name:<5} {need:>22}{fits}  {traffic}")
    lines += textwrap.wrap(f"{'use ' if advice.suggested else ''}{advice.reason}", width=100,
                           initial_indent="  ", subsequent_indent="      ")
    if advice.suggested not in (None, advice.planned):
        lines.append(f"  (the table above is costed with --strategy {advice.planned}; plan again "
                     f"with --strategy {advice.suggested})")
    return lines


def format_inspection(ins: "Inspection", bar_width: int = 30) -> str:
    c = ins.config
    scale = "alpha/sqrt(r)" if c.get("use_rslora") else "alpha/r"
    targets = c.get("target_modules")
    targets = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    pairs = 2 * len(ins.modules)
    lines = [
        f"Adapter     {ins.directory}",
        f"Base model  {ins.base_model or 'not recorded (base_model_name_or_path is empty)'}"
        + (f", trained on its {ins.base_precision} quantization (QLoRA)" if ins.base_precision else ""),
        f"Config      r={c['r']}, lora_alpha={c['lora_alpha']:g} (scale = {scale}), "
        f"lora_dropout={c.get('lora_dropout', 0):g}, rsLoRA {'on' if c.get('use_rslora') else 'off'}, "
        f"DoRA {'on' if c.get('use_dora') else 'off'}",
        f"Targets     {targets}",
        f"Tensors     {pairs} LoRA tensors for {len(ins.modules)} modules; {ins.params:,} "
        f"parameters ({', '.join(ins.dtypes)}); file {human_bytes(ins.file_bytes)}",
    ]
    if ins.other_tensors:
        lines.append(f"            and {len(ins.other_tensors)} other tensors "
                     "(DoRA magnitudes, saved embedding tables, biases)")
    lines += ["", "Modules", f"  {'module':<24} {'count':>5} {'r':>4} {'alpha':>6} {'scale':>7} "
              f"{'in -> out':>15} {'params':>12}"]
    for row in _module_rows(ins):
        lines.append(f"  {row['module']:<24} {row['count']:>5} {row['r']:>4} {row['alpha']:>6g} "
                     f"{row['scale']:>7.3g} {row['shape']:>15} {row['params']:>12,}")
    norms = ins.layer_norms
    if norms:
        top = max(norms.values())
        ranked = sorted(norms, key=norms.get, reverse=True)[:3]
        lines += ["", "Learned update per layer, ||scale * B @ A|| (Frobenius)"]
        for layer, norm in norms.items():
            bar = "#" * (round(bar_width * norm / top) if top > 0 and math.isfinite(norm) else 0)
            mark = "  <- most" if layer == ranked[0] and top > 0 else ""
            lines.append(f"  layer {layer:>3}  {norm:10.4g}  {bar}{mark}")
        biggest = max(ins.modules, key=lambda m: m.update_norm if math.isfinite(m.update_norm) else -1)
        lines.append(f"  changed most: layers {', '.join(map(str, ranked))}; module "
                     f"{biggest.name} ({biggest.update_norm:.4g})")
    outside = [m for m in ins.modules if m.layer is None]
    for m in outside:
        lines.append(f"  outside the blocks: {m.name} ({m.update_norm:.4g})")
    if ins.warnings:
        lines += ["", "Warnings", *(f"  ! {w}" for w in ins.warnings)]
    return "\n".join(lines)


def _module_rows(ins: "Inspection") -> list[dict]:
    rows: dict[tuple, dict] = {}
    for m in ins.modules:
        local = m.name.split(f".{m.layer}.", 1)[1] if m.layer is not None else m.name
        key = (local, m.r, m.lora_alpha)
        row = rows.setdefault(key, dict(module=local, count=0, r=m.r, alpha=m.lora_alpha,
                                        scale=m.scale, params=0,
                                        shape=f"{m.in_features} -> {m.out_features}"))
        row["count"] += 1
        row["params"] += m.params
    return list(rows.values())


def format_diagnosis(d: "Diagnosis", plot_path: str | None = None) -> str:
    s = d.stats
    evals = f"; {s['eval_points']} evaluations" if s["eval_points"] else "; no evaluations"
    steps = f", steps {s['first_step']}-{s['last_step']}" if s["train_points"] else ""
    lines = [
        f"Run      {d.metrics.path} ({s['train_points']} training points{steps}{evals})",
        f"Verdict  {d.verdict.replace('_', ' ').upper()}: {d.summary}",
        f"Confidence {d.confidence}: {d.confidence_reason}",
        "Evidence", *(f"  - {e}" for e in d.evidence),
        "Change", *(f"  - {c}" for c in d.changes),
    ]
    if plot_path:
        lines.append(f"Plot     {plot_path}")
    return "\n".join(lines)
