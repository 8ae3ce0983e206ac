"""`train(config)`: one LoRA fine-tuning run, from the base model to the adapter and its report.

The loop reads top to bottom: batch, forward, loss, backward, clip, step, schedule, log, maybe
evaluate, maybe checkpoint. Setting up (model, data, optimizer: `lorakit.train.setup`) and
finishing (final adapter, score, plot, report) are the functions around it. Whatever the method,
the loop calls the model's per-step hooks: ``auxiliary_loss()`` (added to the step's gradients;
AdaLoRA's orthogonal regulariser) and ``after_optimizer_step(step)`` (AdaLoRA's rank allocation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from lorakit import io
from lorakit.data import PackingCollator, length_grouped_batches, lengths_of, real_token_count
from lorakit.errors import CheckpointError, DiskFullError, TrainingError, TrainingInterrupted
from lorakit.evaluation import score_examples
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed
from lorakit.train.config import TRAIN_METHODS, TrainConfig, variant_summary
from lorakit.train.objectives import heldout_metrics
from lorakit.train.report import plot_losses, read_metrics, write_report
from lorakit.train.schedule import lr_at
from lorakit.train.setup import INITIAL_ADAPTER, Run, TrainState, check_world, prepare, restart_command
from lorakit.train.status import StatusRecorder
from lorakit.variants import inits

__all__ = ["train", "RunResult"]


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path
    steps: int
    score_before: dict | None
    score_after: dict | None
    summary: dict


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

    def stop_now(self, message: Callable[[], str]) -> None:
        """From here on a signal stops at once: raises TrainingInterrupted(``SIGNAME message()``),
        now when one came already, else from the handler (inside ``installed()``)."""
        def interrupt(signum, frame=None):
            raise TrainingInterrupted(f"{signal.Signals(signum).name} {message()}")

        if self.signum is not None:
            interrupt(self.signum)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, interrupt)


def _epoch_batches(lengths: list[int], config: TrainConfig, epoch: int, ranks: int = 1) -> list[list[int]]:
    """The index batches of one epoch, shuffled by (seed, epoch): plain random draws, or similar
    lengths together with ``group_by_length``. With several ranks each batch is every rank's
    examples of one micro-step (``batch_size`` each; `distributed.rank_share` splits it), drawn as
    one process draws a batch of that size: N ranks x batch B/N see the examples of batch B."""
    return length_grouped_batches(lengths, config.batch_size * ranks, seed=config.seed * 1000 + epoch,
                                  group=50 if config.group_by_length else 1)


def _measure_before(run: Run, progress: bool) -> TrainState:
    """A fresh run's starting state, with the untuned model's held-out loss and task score."""
    state = TrainState()
    data, autocast = run.data, run.compute.autocast
    if run.world.is_main:
        run.metrics.path.unlink(missing_ok=True)
    if data.eval_set:
        held = _heldout(run)
        state.heldout_before, state.heldout_before_metrics = held["eval_loss"], held
        run.metrics.write("eval", step=0, **held)
    if data.score_set and run.config.score_before:
        # PiSSA / OLoRA: the base is a residual; the fresh adapter on it is the untuned model. A run
        # from an existing adapter (--init-adapter) starts from that adapter: it is the "before"
        as_started = inits.uses_base_weight(run.config.lora.init_lora_weights) or run.config.init_adapter
        untuned = contextlib.nullcontext() if as_started else run.model.disable_adapter()
        with untuned:
            result = distributed.evaluate(run.trained, lambda model: score_examples(
                model, data.tokenizer, data.score_set, scorer=data.scorer, max_new_tokens=run.config.max_new_tokens,
                autocast=autocast, line_breaks=data.line_breaks))
        state.score_before = result.as_dict()
        run.metrics.write("score", step=0, phase="before", exact=result.exact, **result.fields)
        if progress:
            print(f"{'the starting adapter' if run.config.init_adapter else 'untuned model'}: {result.summary()}",
                  flush=True)
    return state


def train(config: TrainConfig, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Fine-tune ``config.model`` on ``config.data`` and write the run directory.

    With ``resume=True`` (and ``config.run_dir`` set), continue from the newest checkpoint whose
    manifest verifies, with the optimizer, schedule, random state and data position it saved.
    A full disk raises `DiskFullError` naming the file and the space it needed.
    """
    with StatusRecorder() as status:  # <run_dir>/status.json: running, then finished, interrupted or failed
        try:
            result = _train(config, resume, progress, status)
            distributed.leave_world()  # several processes: all have finished; the group is closed cleanly
            return result
        except (OSError, SafetensorError) as err:
            if not ckpt.is_disk_full(err):
                raise
            where = getattr(err, "filename", None) or config.run_dir or config.output_dir
            raise DiskFullError(f"no space left on the device to write {where}: free some space, or write runs to "
                                f"another disk (--output-dir DIR, or --run-dir DIR)") from err


def _train(config: TrainConfig, resume: bool, progress: bool, status: StatusRecorder) -> RunResult:
    check_world(config, distributed.started_by_torchrun())  # before the process group: a refusal exits 2 cleanly
    world = distributed.join_world()
    run = prepare(config, resume, world)
    status.start(run.run_dir, run.schedule.total_steps, enabled=world.is_main)
    with run.metrics.trackers.closed_on_exit():  # an error or a signal ends the tracker runs as failed / killed
        return _steps(run, resume, progress)


def _steps(run: Run, resume: bool, progress: bool) -> RunResult:
    """From the starting state (fresh, or the checkpoint's) through the steps to `_finish`."""
    config, world = run.config, run.world
    model, optimizer, params, metrics = run.model, run.optimizer, run.params, run.metrics
    data, total_steps, trained = run.data, run.schedule.total_steps, run.trained
    state = _resume(run) if resume else _measure_before(run, progress)
    state.processes = world.size
    lengths = lengths_of(data.examples)

    model.train()
    stopper = _StopOnSignal()
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and world.is_main), unit="step",
               dynamic_ncols=True)
    window_loss, window_tokens, window_stats = 0.0, 0, {}
    with stopper.installed():
        while state.step < total_steps:
            batches = _epoch_batches(lengths, config, state.epoch, world.size)
            while state.batch_pos < len(batches) and state.step < total_steps:
                started = time.perf_counter()
                group = [_rank_batch(run, idx) for idx in batches[state.batch_pos:state.batch_pos + config.grad_accum]]
                step_tokens, step_real = distributed.all_sum(
                    [sum(run.objective.units(b) * w for b, w in group),
                     sum(real_token_count(b) * w for b, w in group)], world)
                step_tokens, step_real = int(step_tokens), int(step_real)
                lr = lr_at(state.step, peak=config.learning_rate, total_steps=total_steps,
                           warmup=run.schedule.warmup, min_ratio=config.min_lr_ratio)
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)  # LoRA+: B's group keeps its ratio
                step_loss, step_stats = 0.0, {}
                for i, (batch, weight) in enumerate(group):
                    # DDP and FSDP2 average the ranks' gradients: scaled by the ranks, the step's
                    # gradient is that of the sum over all ranks' label tokens / their global count
                    with distributed.micro_step(trained, last=i == len(group) - 1):
                        with run.compute.autocast():
                            loss, _, stats = trained(batch)
                        (loss * (weight * world.size / step_tokens)).backward()
                    step_loss += loss.item() * weight
                    if stats:  # a preference run's rewards: read back in one transfer
                        for key, value in zip(stats, torch.stack(list(stats.values())).tolist()):
                            step_stats[key] = step_stats.get(key, 0.0) + value * weight
                auxiliary = model.base_model.auxiliary_loss()  # the method's own term, once per step
                if auxiliary is not None:
                    auxiliary.backward()
                keys = sorted(step_stats)
                step_loss, *totals = distributed.all_sum([step_loss, *(step_stats[k] for k in keys)], world)
                step_loss /= step_tokens
                if not math.isfinite(step_loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise TrainingError(
                        f"the training loss became {step_loss} at step {state.step + 1}; stopped without taking "
                        f"that step. Last good checkpoint: {ckpt.latest_checkpoint(run.run_dir) or 'none'}. "
                        f"Lower the learning rate (now {config.learning_rate:g}), keep warm-up and clipping on"
                    )
                grad_norm = distributed.clip_grad_norm(params, config.max_grad_norm)
                optimizer.step()
                model.base_model.after_optimizer_step(state.step + 1)  # on this step's gradients
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_pos += len(group)
                state.tokens += step_real
                state.loss_tokens += step_tokens
                state.train_seconds += time.perf_counter() - started
                window_loss, window_tokens = window_loss + step_loss * step_tokens, window_tokens + step_tokens
                for key, total in zip(keys, totals):
                    window_stats[key] = window_stats.get(key, 0.0) + total

                step = state.step
                if step % config.log_every == 0 or step == total_steps:
                    means = {k: v / window_tokens for k, v in window_stats.items()}  # per pair
                    metrics.write("train", step=step, epoch=round(state.epoch + state.batch_pos / len(batches), 4),
                                  loss=window_loss / window_tokens, lr=lr, grad_norm=grad_norm,
                                  tokens=state.tokens, elapsed_s=round(state.train_seconds, 3), **means)
                    shown = {"acc": f"{means['reward_accuracy']:.2f}", "margin": f"{means['reward_margin']:.3f}"} \
                        if "reward_accuracy" in means else {}
                    bar.set_postfix(loss=f"{window_loss / window_tokens:.4f}", **shown,
                                    tok_s=f"{state.tokens / max(state.train_seconds, 1e-9):.0f}")
                    window_loss, window_tokens, window_stats = 0.0, 0, {}
                bar.update(1)
                if data.eval_set and config.eval_every and step % config.eval_every == 0 and step < total_steps:
                    metrics.write("eval", step=step, **_heldout(run))
                if distributed.any_rank(stopper.signum is not None, world):  # every rank stops at this step
                    bar.close()
                    where = _save(run, state)
                    name = signal.Signals(stopper.signum or signal.SIGTERM).name
                    raise TrainingInterrupted(
                        f"{name} at step {step}; checkpoint saved to {where}; "
                        f"continue with: {_resume_command(run.run_dir, world.size)}"
                    )
                if config.save_every and step % config.save_every == 0 and step < total_steps:
                    _save(run, state)
            if state.batch_pos >= len(batches):
                state.epoch, state.batch_pos = state.epoch + 1, 0
        bar.close()
        return _finish(run, state, progress, stopper)


def _heldout(run: Run) -> dict[str, float]:
    """The objective's held-out metrics (``eval_loss``, and a preference run's rewards), every rank in step."""
    return distributed.evaluate(run.trained, lambda model: heldout_metrics(
        run.objective, model, run.data.eval_set, run.data.collate, run.config.batch_size, run.compute.autocast))


def _rank_batch(run: Run, indices: list[int]) -> tuple[dict[str, torch.Tensor], int]:
    """This rank's micro-batch of a global batch and its weight: 1, or 0 for a rank the short last
    batch leaves without examples (it computes one example's loss times 0, so that every rank
    takes part in the same forwards, backwards and gradient reductions)."""
    mine = distributed.rank_share(indices, run.world)
    batch = run.data.train_collate([run.data.examples[i] for i in (mine or indices[:1])])
    return {k: v.to(run.compute.device) for k, v in batch.items()}, int(bool(mine))


def _save(run: Run, state: TrainState) -> Path:
    """A checkpoint of the whole adapter and optimizer state, as one process writes it (several
    ranks gather their slices first; rank 0 writes), so it resumes on any number of processes."""
    directory = run.run_dir / "checkpoints" / f"step-{state.step:06d}"
    with distributed.whole_state(run.trained, run.optimizer):
        if run.world.is_main:
            ckpt.save_checkpoint(directory, peft_model=run.model, optimizer=run.optimizer,
                                 state=dataclasses.asdict(state), keep=run.config.keep_checkpoints,
                                 advice=lambda: _resume_advice(run))
    distributed.barrier(run.world)
    return directory


def _resume_command(run_dir: Path, processes: int) -> str:
    return f"lorakit train --resume {run_dir}" + (f" --nproc {processes}" if processes > 1 else "")


def _resume_advice(run: Run, lead: str = "then continue") -> str:
    """How to go on (after a full disk, a late signal): from the last checkpoint, if the run has one."""
    latest = ckpt.latest_checkpoint(run.run_dir)
    return "" if latest is None else (f"; {lead} from {latest.name} with: "
                                      f"{_resume_command(run.run_dir, run.world.size)}")


def _resume(run: Run) -> TrainState:
    """The optimizer, schedule, random state and data position of the checkpoint whose adapter
    `prepare` loaded (``run.resume_from``)."""
    latest = run.resume_from
    state = TrainState(**ckpt.load_checkpoint(latest, optimizer=run.optimizer))
    if state.processes != run.world.size:
        counted = lambda n: "one process" if n == 1 else f"{n} processes"  # noqa: E731
        raise CheckpointError(
            f"{latest}: written by a run on {counted(state.processes)}, resumed on {counted(run.world.size)}: each "
            f"micro-step takes batch_size examples per process, so the batches would differ; resume it on "
            f"{counted(state.processes)}: {_resume_command(run.run_dir, state.processes)} (or torchrun "
            f"--nproc-per-node {state.processes} -m lorakit train --resume {run.run_dir})")
    distributed.shard_optimizer_state(run.optimizer)
    run.metrics.truncate_after(state.step)
    print(f"resuming from {latest} (step {state.step})", flush=True)
    return state


def _save_final(run: Run, adapter_dir: Path) -> str | None:
    """Write the run's adapter/; returns a note for the report when it is not saved as trained.

    PiSSA / OLoRA: saved as a plain LoRA adapter (rank 2r) for the ORIGINAL base model, from the
    adapter kept at initialisation (``path_initial_model_for_weight_conversion``). DoRA over them
    has no such form: saved as is, it loads onto the original base by re-running the init."""
    lora, peft_model = run.model.peft_config["default"], run.model
    advice = lambda: _resume_advice(run)  # noqa: E731  (hashes checkpoints: only on a full disk)
    if not inits.uses_base_weight(lora.init_lora_weights):
        ckpt.save_adapter_atomically(peft_model, adapter_dir, advice=advice)
        return None
    if lora.use_dora:
        ckpt.save_adapter_atomically(peft_model, adapter_dir, advice=advice)
        return (f"init {lora.init_lora_weights} with DoRA: saved as trained; it loads onto the original base "
                f"model (loading re-runs the init, in lorakit and PEFT)")
    ckpt.save_adapter_atomically(peft_model, adapter_dir, advice=advice,
                                 path_initial_model_for_weight_conversion=run.run_dir / INITIAL_ADAPTER)
    return (f"init {lora.init_lora_weights}: saved as a plain LoRA adapter of rank {2 * lora.r} for the original "
            f"base model (converted from {INITIAL_ADAPTER}/, the adapter at initialisation)")


def _finish(run: Run, state: TrainState, progress: bool, stopper: _StopOnSignal) -> RunResult:
    """Save the adapter, then evaluate, plot and report. A signal while the adapter is written
    waits for it to be whole; one after it stops at once (the adapter is kept)."""
    config, run_dir, peft_model, metrics, data = run.config, run.run_dir, run.model, run.metrics, run.data
    adapter_dir = run_dir / "adapter"
    with distributed.whole_state(run.trained):
        adapter_note = _save_final(run, adapter_dir) if run.world.is_main else None
    distributed.barrier(run.world)
    stopper.stop_now(lambda: (
        f"after the last step ({state.step}): the adapter is saved in {adapter_dir}; the final evaluation and "
        f"report were not written{_resume_advice(run, 'to write them, train the last steps again')}"))
    heldout_after, heldout_after_metrics = None, None
    if data.eval_set:
        heldout_after_metrics = _heldout(run)
        heldout_after = heldout_after_metrics["eval_loss"]
        metrics.write("eval", step=state.step, **heldout_after_metrics)
    score_after = None
    if data.score_set:
        result = distributed.evaluate(run.trained, lambda model: score_examples(
            model, data.tokenizer, data.score_set, scorer=data.scorer, max_new_tokens=config.max_new_tokens,
            autocast=run.compute.autocast, line_breaks=data.line_breaks))
        score_after = result.as_dict()
        metrics.write("score", step=state.step, phase="after", exact=result.exact, **result.fields)
        if progress:
            print(f"with the adapter: {result.summary()}", flush=True)
    if not run.world.is_main:  # rank 0 writes the plot and the report
        return RunResult(run_dir, adapter_dir, state.step, state.score_before, score_after, {})
    records = read_metrics(run_dir / "metrics.jsonl")
    losses = config.loss_type if isinstance(config.loss_type, str) else " + ".join(config.loss_type)
    ylabel = {"dpo": f"DPO loss ({losses}) per pair", "orpo": "ORPO loss per pair"}.get(
        config.method, "cross-entropy per answer token")
    plot_losses(records, run_dir / "loss.png", title=f"{config.name}: {config.model} on {config.data}", ylabel=ylabel)
    train_losses = [m["loss"] for m in records if m["kind"] == "train"]
    lora = peft_model.peft_config["default"]
    trainable, total = peft_model.get_nb_trainable_parameters()
    summary = {
        "r": TRAIN_METHODS[config.method].final_rank(lora),  # AdaLoRA: the average rank it ends at
        "lora_alpha": lora.lora_alpha, "lora_dropout": lora.lora_dropout,
        "variant": variant_summary(config), "use_rslora": lora.use_rslora, "use_dora": lora.use_dora,
        "init_lora_weights": lora.init_lora_weights, "loraplus_ratio": config.loraplus_ratio,
        "target_modules": sorted(lora.target_modules), "trainable": trainable, "total": total,
        "precision": run.compute.precision, "quantize": config.quantize, "packing": isinstance(data.train_collate, PackingCollator),
        "varlen": getattr(data.train_collate, "varlen", False),
        "shared_prefix": getattr(data.train_collate, "share_prefix", False),
        "attention": peft_model.get_base_model().config._attn_implementation,
        "steps": state.step, "epochs": state.step / run.schedule.steps_per_epoch,
        "tokens": state.tokens, "loss_tokens": state.loss_tokens, "train_seconds": state.train_seconds,
        "tokens_per_second": state.tokens / max(state.train_seconds, 1e-9),
        "final_loss": train_losses[-1] if train_losses else None,
        "heldout_before": state.heldout_before, "heldout_after": heldout_after,
        "heldout_before_metrics": state.heldout_before_metrics, "heldout_after_metrics": heldout_after_metrics,
        "method": config.method, "preference": TRAIN_METHODS[config.method].preference,
        "adapter_note": adapter_note, "processes": run.world.size,
        "strategy": config.strategy if run.world.distributed else None,
    }
    splits = data.splits
    described = {"train": f"{splits.train.summary()} ({len(data.examples):,} used)",
                 "val": splits.val.summary() if splits.val else "none",
                 "train_skipped": splits.train.skipped, "val_skipped": splits.val.skipped if splits.val else {},
                 "summary": [line for part in (splits.train, splits.val) if part for line in part.describe()]}
    write_report(run_dir / "report.md", config=config.to_dict(), summary=summary, data=described,
                 score_before=state.score_before, score_after=score_after)
    metrics.trackers.log_artifacts([run_dir / "report.md", run_dir / "loss.png"])
    metrics.trackers.close("finished")
    return RunResult(run_dir, adapter_dir, state.step, state.score_before, score_after, summary)
