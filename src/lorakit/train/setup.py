"""What a training run sets up before its first step, and the state it carries from step to step.

    Run        the run's parts, grouped: where it computes (`Compute`), the model and optimizer,
               the data and its batching (`RunData`), the step budget (`Schedule`), the metrics log
    TrainState where the run stands (step, data position, totals); checkpointed, restored on resume
    prepare    builds a Run from a TrainConfig: run directory, model, data, adapter, optimizer
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from lorakit import io
from lorakit.data import (Collator, PackingCollator, PairCollator, PairStreamCollator, load_data, load_preferences,
                          supports_packing, supports_varlen, subset)
from lorakit.data.records import data_field_map
from lorakit.errors import CheckpointError, ConfigError
from lorakit.evaluation import line_breaks_for, scorer_for
from lorakit.model import PeftModel, get_peft_model
from lorakit.models import load_model
from lorakit.models.speedup import autocast_for, resolve_precision
from lorakit.plugins import method_for
from lorakit.train import checkpoint as ckpt
from lorakit.train import distributed, tracking
from lorakit.train.config import TRAIN_METHODS, TrainConfig
from lorakit.train.distributed import World
from lorakit.train.fast import make_optimizer, speed_up
from lorakit.train.objectives import objective_for
from lorakit.train.preference import REFERENCE_ADAPTER
from lorakit.train.report import MetricsLog
from lorakit.train.schedule import warmup_steps
from lorakit.variants import inits

__all__ = ["TrainState", "Compute", "RunData", "Schedule", "Run", "prepare", "resolve_precision", "autocast_for",
           "INITIAL_ADAPTER", "restart_command"]

INITIAL_ADAPTER = "initial_adapter"
"""PiSSA / OLoRA runs: the adapter as initialised, kept to convert the final one."""


@dataclass
class TrainState:
    """Where a run stands after an optimizer step; saved in every checkpoint (state.json)."""

    step: int = 0
    """Optimizer steps taken."""
    epoch: int = 0
    batch_pos: int = 0
    """The next micro-batch of this epoch's order."""
    tokens: int = 0
    """Real (non-padding) tokens trained on."""
    loss_tokens: int = 0
    """Tokens the loss was taken over (labels)."""
    train_seconds: float = 0.0
    score_before: dict | None = None
    """The untuned model's task score (a fresh run that measured it)."""
    heldout_before: float | None = None
    """The untuned model's held-out loss."""
    heldout_before_metrics: dict | None = None
    """All the untuned model's held-out metrics (a preference run's rewards and reward accuracy)."""
    processes: int = 1
    """How many processes trained (each micro-step took batch_size examples on each): a run resumes
    on as many, for the same batches in the same order."""


@dataclass
class Compute:
    """Where and how the run computes."""

    device: torch.device
    precision: str
    """fp32 or bf16 (resolved from "auto")."""
    autocast: Callable[[], Any]
    """A context-manager factory for forwards (bf16 autocast, or nothing)."""


@dataclass
class RunData:
    """The examples and how they become batches."""

    tokenizer: Any
    splits: Any
    examples: list
    """The training examples used (train_examples of them, seeded)."""
    eval_set: list
    """Held-out examples for the loss."""
    score_set: list
    """Held-out examples scored by generation."""
    scorer: str
    line_breaks: tuple[int, ...] | None
    """The scorer's stop ids (`lorakit.evaluation.line_breaks_for`), computed once for both scorings."""
    collate: Collator
    """Padded batches, for the held-out loss."""
    train_collate: Collator | PackingCollator
    """The training micro-batches: packed rows where the model supports them, else padded."""


@dataclass
class Schedule:
    """The run's step budget."""

    total_steps: int
    steps_per_epoch: int
    warmup: int
    """Steps of linear learning-rate warm-up."""


@dataclass
class Run:
    """Everything a run sets up before its first step."""

    config: TrainConfig
    run_dir: Path
    compute: Compute
    model: PeftModel
    trained: torch.nn.Module
    """What a training step calls: the loss sum of a batch (`distributed.LossModule`), under DDP or
    FSDP2 when several processes train."""
    world: World
    resume_from: Path | None
    """The checkpoint the run resumes from (its adapter already loaded), or None."""
    optimizer: torch.optim.Optimizer
    params: list
    """The trainable parameters (clipped together)."""
    objective: Any
    """What a step minimises (`lorakit.train.objectives`): SFT's token loss, or DPO / ORPO on pairs."""
    data: RunData
    schedule: Schedule
    metrics: MetricsLog


def _new_run_dir(config: TrainConfig) -> Path:
    if config.run_dir:
        return Path(config.run_dir)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(config.output_dir) / f"{stamp}-{config.name}"


def restart_command(run_dir: Path, flags: str = "", *, use_config: bool = True) -> str:
    """The command that starts a run again from its first step, in the same directory: from its
    config.yaml where it has a usable one, else from ``flags`` (those the run was first given)."""
    if use_config and (Path(run_dir) / "config.yaml").is_file():
        return f"lorakit train --config {Path(run_dir) / 'config.yaml'}"
    return f"lorakit train --run-dir {run_dir}{' ' + flags if flags else ' <the options you first gave>'}"


def _remove_stale_writes(run_dir: Path) -> None:
    """Temporary directories of checkpoint / adapter writes a kill interrupted: removed, and said."""
    removed = ckpt.remove_stale_tmp(run_dir / "checkpoints") + ckpt.remove_stale_tmp(run_dir)
    if removed:
        print(f"removed {len(removed)} unfinished write(s) a stopped run left behind: "
              f"{', '.join(p.name for p in removed)}", flush=True)


def check_world(config: TrainConfig, distributed: bool) -> None:
    """What a run of several processes refuses, from the config alone: `lorakit.train.loop` asks
    before the process group exists (a rank that refuses then exits 2 with no peer to abort it),
    and `prepare` asks again for callers that bring their own `World`."""
    if not distributed:
        return
    if config.method == "adalora":
        raise ConfigError(f"method={config.method}: trains in one process for now (its rank allocation reads "
                          "every gradient of the step); run it without torchrun / --nproc, or use method lora")
    if config.strategy == "fsdp" and TRAIN_METHODS[config.method].preference:
        raise ConfigError(f"method={config.method} with --strategy fsdp: not supported yet (the reference forward "
                          "runs inside the sharded model's forward); use --strategy ddp")
    if config.strategy == "fsdp" and config.quantize:
        raise ConfigError(f"--quantize {config.quantize} with --strategy fsdp: FSDP2 does not shard bitsandbytes' "
                          "quantized weights; use --strategy ddp (each process holds the whole 4-/8-bit base, "
                          "a quarter to a half of its bf16 size), or drop --quantize")


def prepare(config: TrainConfig, resume: bool, world: World | None = None) -> Run:
    """The run directory (config.yaml written), the model with its fresh adapter, the data, the
    optimizer. ``resume``: the run directory must hold checkpoints and the method must resume.
    With several processes (``world``) rank 0 names and writes the run directory; every rank builds
    the model and data alike, and the model is wrapped for ``config.strategy``."""
    world = world or World.single()
    tracking.require(config.report_to)  # a tracker's library missing: said before anything is loaded
    run_dir = Path(distributed.broadcast_text(str(_new_run_dir(config)), world))
    problem = method_for(config.peft_type).resume_problem
    if resume and problem:
        raise CheckpointError(f"resuming is not supported for {method_for(config.peft_type).name} runs: "
                              f"{problem}; start a new run")
    preference = TRAIN_METHODS[config.method].preference
    check_world(config, world.distributed)
    if resume and not (run_dir / "checkpoints").is_dir():
        saves = f"every {config.save_every} steps" if config.save_every else "only when stopped by SIGINT/SIGTERM"
        raise CheckpointError(f"{run_dir}: the run was stopped before its first checkpoint (it saves one {saves}), "
                              f"so there is nothing to resume; start it again with: {restart_command(run_dir)}")
    config.run_dir = str(run_dir)
    if world.is_main:
        with ckpt.writing(run_dir / "config.yaml", lambda: 8_000, what="the run's config"):
            run_dir.mkdir(parents=True, exist_ok=True)
            config.save(run_dir / "config.yaml")
        _remove_stale_writes(run_dir)
    distributed.barrier(world)
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    device = world.device
    precision = resolve_precision(config.precision, device)
    # bf16: frozen base weights stored in bf16 (half the memory, no cast per step); the adapter
    # weights, their gradients and AdamW's moments stay fp32.
    # FSDP2 on GPUs: loaded into the machine's memory, then each decoder layer moves to the GPU as it
    # is sharded (one whole layer at a time there), so a model that does not fit one GPU trains
    sharded = world.distributed and config.strategy == "fsdp"
    # --quantize: the linear layers but the output head stored in 4 or 8 bits, computing in the precision
    model, tokenizer = load_model(config.model, device=torch.device("cpu") if sharded else device,
                                  dtype=torch.bfloat16 if precision == "bf16" else torch.float32,
                                  quantize=config.quantize)
    shapes = {} if preference else {"record_format": config.data_format,
                                    "fields": data_field_map(config.data_fields or [])}
    reader = load_preferences if preference else load_data
    splits = reader(config.data, tokenizer=tokenizer, val=config.val_file, val_fraction=config.val_fraction,
                    seed=config.seed, max_length=config.max_length, overlong=config.overlong,
                    skip_bad_records=config.skip_bad_records, **shapes)
    if world.is_main:  # the data summary, before anything trains (report.md keeps it)
        for part in (splits.train, splits.val):
            if part is not None:
                print("\n".join(part.describe()), flush=True)
    examples = splits.train.examples  # a view of examples kept on disk, or a list (preference pairs)
    if config.train_examples is not None and config.train_examples < len(examples):
        picked = sorted(random.Random(config.seed).sample(range(len(examples)), config.train_examples))
        examples = subset(examples, picked)
    heldout = splits.val.examples if splits.val is not None else []
    score_set, scorer = heldout[: config.score_examples], scorer_for(config.data)
    if preference:  # scored on the prompt and chosen answer of each held-out pair
        score_set = [pair.scored for pair in score_set]

    # the batch of one micro-step is batch_size examples on each rank: batch_size x ranks in all
    steps_per_epoch = math.ceil(math.ceil(len(examples) / (config.batch_size * world.size)) / config.grad_accum)
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    peft_model = get_peft_model(model, config.adapter_config(total_steps))
    if config.init_adapter:
        _start_from(peft_model, config)
    if inits.uses_base_weight(config.lora.init_lora_weights) and not (run_dir / INITIAL_ADAPTER).is_dir():
        # PiSSA / OLoRA made the base weights a residual: keep the adapter as initialised, to save
        # the trained one as a plain LoRA adapter for the original base model (see loop._save_final)
        if world.is_main:
            ckpt.save_adapter_atomically(peft_model, run_dir / INITIAL_ADAPTER)
        distributed.barrier(world)
    for note in speed_up(peft_model, attention=config.attention, fused_norms=config.fused_norms,
                         gradient_checkpointing=config.gradient_checkpointing, compile=config.compile):
        print(note, flush=True)
    resume_from = _load_latest_adapter(peft_model, run_dir) if resume else None
    objective = objective_for(config)
    # FSDP2 shards the parameters: the optimizer comes after
    trained = distributed.wrap(peft_model, world, config.strategy, objective)
    if world.distributed:
        print(f"{world.size} processes ({config.strategy}), batch {config.batch_size} each: "
              f"{config.batch_size * world.size} examples per micro-step; frozen weights held by each process: "
              f"{distributed.local_bytes(peft_model, trainable=False) / 2**20:,.1f} MiB", flush=True)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                               model=peft_model, loraplus_ratio=config.loraplus_ratio)
    collate = PairCollator(tokenizer.pad_token_id) if preference else Collator(tokenizer.pad_token_id)
    train_collate = collate
    if preference:
        # lorakit's attention: each pair's prompt computed once for both answers, and no padding;
        # otherwise (or with LoRA dropout, whose masks the answers would share) padded rows, as TRL's
        if config.packing and supports_varlen(peft_model) and not peft_model.peft_config["default"].lora_dropout:
            train_collate = PairStreamCollator()
    elif config.packing and supports_packing(peft_model):
        # with lorakit's attention all examples in one row, attended one by one (no padding at all),
        # and without LoRA dropout the tokens they all start with computed once; otherwise rows no
        # longer than the longest example
        varlen = supports_varlen(peft_model)
        share = varlen and not peft_model.peft_config["default"].lora_dropout
        train_collate = PackingCollator(tokenizer.pad_token_id, varlen=varlen, share_prefix=share)
    elif config.packing:
        print(f"packing off: {model.config.model_type} with {model.config._attn_implementation} attention may let "
              "packed examples see each other, so training uses padded batches (same loss, more padding)", flush=True)
    return Run(
        config=config, run_dir=run_dir,
        compute=Compute(device=device, precision=precision, autocast=autocast_for(precision, device)),
        model=peft_model, trained=trained, world=world, resume_from=resume_from, optimizer=optimizer, params=params,
        objective=objective,
        data=RunData(tokenizer=tokenizer, splits=splits, examples=examples,
                     eval_set=heldout[: config.eval_examples] if config.eval_examples else heldout,
                     score_set=score_set, scorer=scorer,
                     line_breaks=line_breaks_for(scorer, tokenizer) if score_set else None,
                     collate=collate, train_collate=train_collate),
        schedule=Schedule(total_steps=total_steps, steps_per_epoch=steps_per_epoch,
                          warmup=warmup_steps(total_steps, config.warmup_ratio)),
        metrics=MetricsLog(run_dir / "metrics.jsonl", enabled=world.is_main, trackers=tracking.open_trackers(
            config.report_to if world.is_main else [], run_dir, config=config.to_dict(), resume=resume,
            tracking_uri=config.tracking_uri)),
    )


def _start_from(peft_model: PeftModel, config: TrainConfig) -> None:
    """Load ``config.init_adapter`` into the adapter to train; DPO (with a reference) also keeps
    it, frozen, as the adapter named ``ref``: its reference model is where it started."""
    path = Path(config.init_adapter)
    start, tensors = io.read_adapter(path)
    lora = peft_model.peft_config["default"]
    shape = ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "rank_pattern", "alpha_pattern",
             "modules_to_save", "layers_to_transform", "bias")
    different = [k for k in shape if _normalised(getattr(start, k, None)) != _normalised(getattr(lora, k, None))]
    if different:
        raise ConfigError(f"init_adapter={path}: its {', '.join(different)} differ from the run's adapter settings; "
                          f"start from it without adapter options (they come from its adapter_config.json)")
    io.load_adapter_tensors(peft_model.get_base_model(), "default", lora, tensors, path)
    if config.method == "dpo" and not config.reference_free:
        peft_model.add_adapter(REFERENCE_ADAPTER, dataclasses.replace(lora, inference_mode=True))
        io.load_adapter_tensors(peft_model.get_base_model(), REFERENCE_ADAPTER, lora, tensors, path)
        peft_model.set_adapter("default")


def _normalised(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, list, tuple)) else value


def _load_latest_adapter(peft_model: PeftModel, run_dir: Path) -> Path:
    """The newest checkpoint that verifies, its adapter loaded into ``peft_model`` (before any
    sharding); the optimizer and training state are loaded by the loop."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise CheckpointError(f"{run_dir}: no checkpoint verifies against its manifest, so there is nothing "
                              f"to resume; start the run again with: {restart_command(run_dir)}")
    _, tensors = io.read_adapter(latest / "adapter")
    io.load_adapter_tensors(peft_model.get_base_model(), "default", peft_model.peft_config["default"],
                            tensors, latest / "adapter")
    return latest
