"""`train(config)`: one LoRA fine-tuning run, from the base model to the adapter and its report.

The loop reads top to bottom: batch, forward, loss, backward, clip, step, schedule, log, maybe
evaluate, maybe checkpoint. Setting up (model, data, optimizer, resume) and finishing (final
adapter, score, plot, report) are the functions around it.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import lorakit.io as io
from lorakit.data import (IGNORE_INDEX, Collator, PackingCollator, length_grouped_batches, load_data,
                          real_token_count, supports_packing, supports_varlen)
from lorakit.errors import CheckpointError, TrainingError, TrainingInterrupted
from lorakit.evaluation import heldout_loss, loss_sum, score_examples, scorer_for
from lorakit.model import PeftModel, get_peft_model
from lorakit.models import load_model
from lorakit.train import checkpoint as ckpt
from lorakit.train.config import TrainConfig, variant_summary
from lorakit.train.fast import make_optimizer, speed_up
from lorakit.train.report import MetricsLog, plot_losses, read_metrics, write_report
from lorakit.train.schedule import lr_at, warmup_steps
from lorakit.variants import inits

__all__ = ["train", "RunResult", "autocast_for", "resolve_precision"]

INITIAL_ADAPTER = "initial_adapter"
"""PiSSA / OLoRA runs: the adapter as initialised, kept to convert the final one."""


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    score_before: dict | None
    score_after: dict | None
    summary: dict


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto" is bf16 where the hardware multiplies bf16 natively, else fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "fp32"


def autocast_for(precision: str, device: torch.device):
    """A context-manager factory: bf16 autocast (so the fp32 adapter runs in bf16 too), or nothing."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class _StopOnSignal:
    """Turns SIGINT / SIGTERM into a flag the loop checks after each optimizer step."""

    def __init__(self):
        self.signum: int | None = None

    def __call__(self, signum, frame):
        self.signum = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _new_run_dir(config: TrainConfig) -> Path:
    if config.run_dir:
        return Path(config.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir) / f"{stamp}-{config.name}"


def _epoch_batches(lengths: list[int], config: TrainConfig, epoch: int) -> list[list[int]]:
    """The index batches of one epoch, shuffled by (seed, epoch): plain random draws, or similar
    lengths together with ``group_by_length``."""
    return length_grouped_batches(lengths, config.batch_size, seed=config.seed * 1000 + epoch,
                                  group=50 if config.group_by_length else 1)


@dataclass
class _Run:
    """Everything a run sets up before its first step."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    precision: str
    autocast: Any
    peft_model: PeftModel
    tokenizer: Any
    splits: Any
    examples: list
    eval_set: list
    score_set: list
    scorer: str
    collate: Collator
    """Padded batches, for the held-out loss."""
    train_collate: Collator | PackingCollator
    """The training micro-batches: packed rows where the model supports them, else padded."""
    optimizer: torch.optim.Optimizer
    params: list
    total_steps: int
    steps_per_epoch: int
    warmup: int
    metrics: MetricsLog


def _prepare(config: TrainConfig, resume: bool) -> _Run:
    run_dir = _new_run_dir(config)
    if resume and config.method == "adalora":
        raise CheckpointError("resuming an AdaLoRA run is not supported: its rank allocator's importance "
                              "averages are not checkpointed; start a new run")
    if resume and not (run_dir / "checkpoints").is_dir():
        raise CheckpointError(f"{run_dir}: no checkpoints to resume from")
    run_dir.mkdir(parents=True, exist_ok=True)
    config.run_dir = str(run_dir)
    config.save(run_dir / "config.yaml")
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(config.precision, device)
    # bf16: frozen base weights stored in bf16 (half the memory, no cast per step); the adapter
    # weights, their gradients and AdamW's moments stay fp32.
    model, tokenizer = load_model(config.model, device=device,
                                  dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    splits = load_data(config.data, tokenizer=tokenizer, val=config.val_file, val_fraction=config.val_fraction,
                       seed=config.seed, max_length=config.max_length, overlong=config.overlong,
                       skip_bad_records=config.skip_bad_records)
    examples = list(splits.train.examples)
    if config.train_examples is not None and config.train_examples < len(examples):
        picked = sorted(random.Random(config.seed).sample(range(len(examples)), config.train_examples))
        examples = [examples[i] for i in picked]
    heldout = list(splits.val.examples) if splits.val is not None else []

    steps_per_epoch = math.ceil(math.ceil(len(examples) / config.batch_size) / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    peft_model = get_peft_model(model, config.adapter_config(total_steps))
    if inits.uses_base_weight(config.init_lora_weights) and not (run_dir / INITIAL_ADAPTER).is_dir():
        # PiSSA / OLoRA made the base weights a residual: keep the adapter as initialised, to save
        # the trained one as a plain LoRA adapter for the original base model (see _save_final)
        peft_model.save_pretrained(run_dir / INITIAL_ADAPTER)
    for note in speed_up(peft_model, attention=config.attention, fused_norms=config.fused_norms,
                         gradient_checkpointing=config.gradient_checkpointing, compile=config.compile):
        print(note, flush=True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                               model=peft_model, loraplus_ratio=config.loraplus_ratio)
    collate = Collator(tokenizer.pad_token_id)
    train_collate = collate
    if config.packing and supports_packing(peft_model):
        # with lorakit's attention all examples in one row, attended one by one (no padding at all),
        # and without LoRA dropout the tokens they all start with computed once; otherwise rows no
        # longer than the longest example
        varlen = supports_varlen(peft_model)
        share = varlen and not peft_model.peft_config["default"].lora_dropout
        train_collate = PackingCollator(tokenizer.pad_token_id, varlen=varlen, share_prefix=share)
    elif config.packing:
        print(f"packing off: {model.config.model_type} with {model.config._attn_implementation} attention may let "
              "packed examples see each other, so training uses padded batches (same loss, more padding)", flush=True)
    return _Run(
        config=config, run_dir=run_dir, device=device, precision=precision,
        autocast=autocast_for(precision, device), peft_model=peft_model, tokenizer=tokenizer, splits=splits,
        examples=examples, eval_set=heldout[: config.eval_examples] if config.eval_examples else heldout,
        score_set=heldout[: config.score_examples], scorer=scorer_for(config.data),
        collate=collate, train_collate=train_collate, optimizer=optimizer, params=params,
        total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        warmup=warmup_steps(total_steps, config.warmup_ratio), metrics=MetricsLog(run_dir / "metrics.jsonl"),
    )


def _measure_before(run: _Run, progress: bool) -> dict[str, Any]:
    """A fresh run's starting state, with the untuned model's held-out loss and task score."""
    state: dict[str, Any] = {"step": 0, "epoch": 0, "batch_pos": 0, "tokens": 0, "loss_tokens": 0,
                             "train_seconds": 0.0, "score_before": None, "heldout_before": None}
    run.metrics.path.unlink(missing_ok=True)
    if run.eval_set:
        state["heldout_before"] = heldout_loss(run.peft_model, run.eval_set, run.collate,
                                               run.config.batch_size, run.autocast)
        run.metrics.write("eval", step=0, eval_loss=state["heldout_before"])
    if run.score_set and run.config.score_before:
        # PiSSA / OLoRA: the base is a residual; the fresh adapter on it is the untuned model
        untuned = contextlib.nullcontext() if inits.uses_base_weight(run.config.init_lora_weights) \
            else run.peft_model.disable_adapter()
        with untuned:
            result = score_examples(run.peft_model, run.tokenizer, run.score_set, scorer=run.scorer,
                                    max_new_tokens=run.config.max_new_tokens, autocast=run.autocast)
        state["score_before"] = result.as_dict()
        run.metrics.write("score", step=0, phase="before", exact=result.exact, **result.fields)
        if progress:
            print(f"untuned model: {result.summary()}", flush=True)
    return state


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run directory.

    With ``resume=True`` (and ``config.run_dir`` set), continue from the newest checkpoint whose
    manifest verifies, with the optimizer, schedule, random state and data position it saved.
    """
    run = _prepare(config, resume)
    model, optimizer, params, metrics = run.peft_model, run.optimizer, run.params, run.metrics
    state = _resume(run) if resume else _measure_before(run, progress)
    lengths = [len(e) for e in run.examples]

    model.train()
    step, epoch, batch_pos = state["step"], state["epoch"], state["batch_pos"]
    stopper = _StopOnSignal()
    bar = tqdm(total=run.total_steps, initial=step, disable=not progress, unit="step", dynamic_ncols=True)
    window_loss, window_tokens = 0.0, 0
    with stopper.installed():
        while step < run.total_steps:
            batches = _epoch_batches(lengths, config, epoch)
            while batch_pos < len(batches) and step < run.total_steps:
                started = time.perf_counter()
                group = [run.train_collate([run.examples[i] for i in idx])
                         for idx in batches[batch_pos:batch_pos + config.grad_accum]]
                group = [{k: v.to(run.device) for k, v in b.items()} for b in group]
                step_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in group)
                lr = lr_at(step, peak=config.learning_rate, total_steps=run.total_steps, warmup=run.warmup,
                           min_ratio=config.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)  # LoRA+: B's group keeps its ratio
                step_loss = 0.0
                for batch in group:
                    with run.autocast():
                        loss, _ = loss_sum(model, batch)
                    (loss / step_tokens).backward()
                    step_loss += loss.item()
                if config.method == "adalora":  # AdaLoRA's orthogonal regulariser, once per step
                    model.base_model.orthogonal_loss().backward()
                step_loss /= step_tokens
                if not math.isfinite(step_loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"the training loss became {step_loss} at step {step + 1}; stopped without taking "
                        f"that step. Last good checkpoint: {ckpt.latest_checkpoint(run.run_dir) or 'none'}. "
                        f"Lower the learning rate (now {config.learning_rate:g}), keep warm-up and clipping on"
                    )
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
                optimizer.step()
                if config.method == "adalora":  # score the triplets on this step's gradients, mask to budget
                    model.base_model.update_and_allocate(step + 1)
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_pos += len(group)
                state["tokens"] += sum(real_token_count(b) for b in group)
                state["loss_tokens"] += step_tokens
                state["train_seconds"] += time.perf_counter() - started
                window_loss, window_tokens = window_loss + step_loss * step_tokens, window_tokens + step_tokens

                if step % config.log_every == 0 or step == run.total_steps:
                    metrics.write("train", step=step, epoch=round(epoch + batch_pos / len(batches), 4),
                                  loss=window_loss / window_tokens, lr=lr, grad_norm=grad_norm,
                                  tokens=state["tokens"], elapsed_s=round(state["train_seconds"], 3))
                    bar.set_postfix(loss=f"{window_loss / window_tokens:.4f}",
                                    tok_s=f"{state['tokens'] / max(state['train_seconds'], 1e-9):.0f}")
                    window_loss, window_tokens = 0.0, 0
                bar.update(1)
                if run.eval_set and config.eval_every and step % config.eval_every == 0 and step < run.total_steps:
                    metrics.write("eval", step=step, eval_loss=heldout_loss(
                        model, run.eval_set, run.collate, config.batch_size, run.autocast))
                state.update(step=step, epoch=epoch, batch_pos=batch_pos)
                if stopper.signum is not None:
                    bar.close()
                    where = _save(run, state)
                    raise TrainingInterrupted(
                        f"{signal.Signals(stopper.signum).name} at step {step}; checkpoint saved to {where}; "
                        f"continue with: lorakit train --resume {run.run_dir}"
                    )
                if config.save_every and step % config.save_every == 0 and step < run.total_steps:
                    _save(run, state)
            if batch_pos >= len(batches):
                epoch, batch_pos = epoch + 1, 0
    bar.close()
    state.update(step=step, epoch=epoch, batch_pos=batch_pos)
    return _finish(run, state, progress)


def _save(run: _Run, state: dict) -> Path:
    return ckpt.save_checkpoint(run.run_dir / "checkpoints" / f"step-{state['step']:06d}",
                                peft_model=run.peft_model, optimizer=run.optimizer, state=state,
                                keep=run.config.keep_checkpoints)


def _resume(run: _Run) -> dict:
    latest = ckpt.latest_checkpoint(run.run_dir)
    if latest is None:
        raise CheckpointError(f"{run.run_dir}: no checkpoint verifies against its manifest; start a new run")
    _, tensors = io.read_adapter(latest / "adapter")
    io.load_adapter_tensors(run.peft_model.get_base_model(), "default", run.peft_model.peft_config["default"],
                            tensors, latest / "adapter")
    state = ckpt.load_checkpoint(latest, optimizer=run.optimizer)
    run.metrics.truncate_after(state["step"])
    print(f"resuming from {latest} (step {state['step']})", flush=True)
    return state


def _save_final(run: _Run, adapter_dir: Path) -> str | None:
    """Write the run's adapter/; returns a note for the report when it is not saved as trained.

    PiSSA / OLoRA: saved as a plain LoRA adapter (rank 2r) for the ORIGINAL base model, from the
    adapter kept at initialisation (``path_initial_model_for_weight_conversion``). DoRA over them
    has no such form: saved as is, it loads onto the original base by re-running the init."""
    lora, peft_model = run.peft_model.peft_config["default"], run.peft_model
    if not inits.uses_base_weight(lora.init_lora_weights):
        peft_model.save_pretrained(adapter_dir)
        return None
    if lora.use_dora:
        peft_model.save_pretrained(adapter_dir)
        return (f"init {lora.init_lora_weights} with DoRA: saved as trained; it loads onto the original base "
                f"model (loading re-runs the init, in lorakit and PEFT)")
    peft_model.save_pretrained(adapter_dir, path_initial_model_for_weight_conversion=run.run_dir / INITIAL_ADAPTER)
    return (f"init {lora.init_lora_weights}: saved as a plain LoRA adapter of rank {2 * lora.r} for the original "
            f"base model (converted from {INITIAL_ADAPTER}/, the adapter at initialisation)")


def _finish(run: _Run, state: dict, progress: bool) -> RunResult:
    config, run_dir, peft_model, metrics = run.config, run.run_dir, run.peft_model, run.metrics
    adapter_dir = run_dir / "adapter"
    adapter_note = _save_final(run, adapter_dir)
    heldout_after = None
    if run.eval_set:
        heldout_after = heldout_loss(peft_model, run.eval_set, run.collate, config.batch_size, run.autocast)
        metrics.write("eval", step=state["step"], eval_loss=heldout_after)
    score_after = None
    if run.score_set:
        result = score_examples(peft_model, run.tokenizer, run.score_set, scorer=run.scorer,
                                max_new_tokens=config.max_new_tokens, autocast=run.autocast)
        score_after = result.as_dict()
        metrics.write("score", step=state["step"], phase="after", exact=result.exact, **result.fields)
        if progress:
            print(f"with the adapter: {result.summary()}", flush=True)
    records = read_metrics(run_dir / "metrics.jsonl")
    plot_losses(records, run_dir / "loss.png", title=f"{config.name}: {config.model} on {config.data}")
    train_losses = [m["loss"] for m in records if m["kind"] == "train"]
    lora = peft_model.peft_config["default"]
    trainable, total = peft_model.get_nb_trainable_parameters()
    summary = {
        "r": getattr(lora, "target_r", lora.r),  # AdaLoRA: the average rank it ends at
        "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
        "variant": variant_summary(config), "use_rslora": lora.use_rslora, "use_dora": lora.use_dora,
        "init_lora_weights": lora.init_lora_weights, "loraplus_ratio": config.loraplus_ratio,
        "target_modules": sorted(lora.target_modules), "trainable": trainable, "total": total,
        "precision": run.precision, "packing": isinstance(run.train_collate, PackingCollator),
        "varlen": getattr(run.train_collate, "varlen", False),
        "shared_prefix": getattr(run.train_collate, "share_prefix", False),
        "attention": peft_model.get_base_model().config._attn_implementation,
        "steps": state["step"], "epochs": state["step"] / run.steps_per_epoch,
        "tokens": state["tokens"], "loss_tokens": state["loss_tokens"], "train_seconds": state["train_seconds"],
        "tokens_per_second": state["tokens"] / max(state["train_seconds"], 1e-9),
        "final_loss": train_losses[-1] if train_losses else None,
        "heldout_before": state.get("heldout_before"), "heldout_after": heldout_after,
        "adapter_note": adapter_note,
    }
    splits = run.splits
    data = {"train": f"{splits.train.summary()} ({len(run.examples):,} used)",
            "val": splits.val.summary() if splits.val else "none",
            "train_skipped": splits.train.skipped, "val_skipped": splits.val.skipped if splits.val else {}}
    write_report(run_dir / "report.md", config=config.to_dict(), summary=summary, data=data,
                 score_before=state.get("score_before"), score_after=score_after)
    return RunResult(run_dir, adapter_dir, state["step"], state.get("score_before"), score_after, summary)
