"""`TrainConfig`: everything a training run needs, as one dataclass that is also `config.yaml`.

A run is re-runnable from its saved `config.yaml`: ``lorakit train --config runs/X/config.yaml``.
Command-line flags override the file; the file overrides the defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lorakit.config import PRESETS, LoraConfig, preset
from lorakit.errors import ConfigError
from lorakit.models.load import DEFAULT_MODEL
from lorakit.train.fast import ATTENTION_CHOICES

__all__ = ["TrainConfig", "load_train_config", "field_docs", "variant_summary", "INIT_CHOICES"]


@dataclass
class TrainConfig:
    """A LoRA fine-tuning run. Defaults: the embedded model, task-api, the balanced preset."""

    # --- what to train on
    model: str = DEFAULT_MODEL
    """An embedded model name, a local HF model directory, or a .gguf file."""
    data: str = "task-api"
    """A built-in dataset name or a JSONL file (text, prompt/completion or messages records)."""
    val_file: Optional[str] = None
    """Held-out JSONL file; else val_fraction of the training file; else the built-in split."""
    val_fraction: float = 0.0
    train_examples: Optional[int] = None
    """Use only the first N training examples (after the seeded shuffle); None: all."""
    max_length: int = 512
    """Examples longer than this many tokens are truncated or dropped (see overlong)."""
    overlong: str = "truncate"
    skip_bad_records: bool = False
    """Skip and count bad records instead of stopping at the first one."""

    # --- the adapter
    preset: str = "balanced"
    """conservative, balanced or max_capacity; the fields below override it."""
    r: Optional[int] = None
    lora_alpha: Optional[float] = None
    lora_dropout: Optional[float] = None
    target_modules: Optional[Union[list[str], str]] = None
    use_rslora: bool = False
    """rsLoRA: scale the update by lora_alpha / sqrt(r) instead of lora_alpha / r (stable at high ranks)."""
    use_dora: bool = False
    """DoRA: a trained magnitude per output feature times the direction of W + scale * B A."""
    init_lora_weights: Union[bool, str] = True
    """How the adapter starts: true (B zero), false, gaussian, pissa, pissa_niter_N (fast SVD) or olora."""
    loraplus_ratio: Optional[float] = None
    """LoRA+: B trains at learning_rate x this ratio (e.g. 16), A at learning_rate; unset: plain AdamW."""
    method: str = "lora"
    """lora, or adalora (AdaLoRA: each layer starts at rank ceil(1.5 r) and is pruned by importance to
    r on average; warm-up 10% of the steps, the last 20% at the final ranks, a reallocation every
    max(1, steps // 100) steps; the adapter is saved PEFT's way, with its rank_pattern)."""

    # --- optimisation
    epochs: float = 1.0
    max_steps: Optional[int] = None
    """Optimizer steps to run; overrides epochs when set."""
    batch_size: int = 8
    group_by_length: bool = False
    """Batch examples of similar length together: less padding, but batches of look-alike examples
    (on task-api, 82.5% held-out exact match against 89.0% with random batches, 1,000 examples)."""
    packing: bool = True
    """Lay each micro-batch's examples end to end in rows no longer than its longest example,
    attention kept inside each example, instead of padding them: same loss, less padding.
    Llama-family models only; others fall back to padded batches, with a message."""
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    """Fraction of the steps spent warming the learning rate up linearly from 0."""
    min_lr_ratio: float = 0.1
    """The cosine decay ends at learning_rate * min_lr_ratio."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm; 0 turns it off."""
    seed: int = 0
    precision: str = "auto"
    """auto (bf16 autocast where the machine runs it fast, else fp32), fp32 or bf16."""
    attention: str = "auto"
    """auto (lorakit's training attention for Llama-family models, else the model's own),
    lorakit, sdpa or eager."""
    fused_norms: bool = True
    """Run Llama-style RMSNorm layers as one fused autograd node (same outputs, fewer passes)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward: much less activation memory, ~1/3 more compute."""
    compile: bool = False
    """torch.compile the decoder layers: for GPUs; on a CPU it compiles for 20-40 s and runs no faster."""

    # --- evaluation, logging, checkpoints
    eval_every: int = 50
    """Held-out loss every N optimizer steps (and at the end); 0: only at the end."""
    eval_examples: Optional[int] = 200
    """Held-out examples used for the loss; None: all."""
    score_examples: int = 200
    """Held-out examples scored by greedy generation before and after training; 0: no scoring."""
    score_before: bool = True
    max_new_tokens: int = 64
    log_every: int = 5
    save_every: int = 100
    """Write a checkpoint every N optimizer steps; 0: only the final adapter."""
    keep_checkpoints: int = 2
    output_dir: str = "runs"
    name: str = "lora"
    run_dir: Optional[str] = None
    """The run directory; default output_dir/<timestamp>-<name>."""

    extra: dict = field(default_factory=dict)
    """Free-form notes carried into the report (e.g. the command that started the run)."""

    def __post_init__(self) -> None:
        self.init_lora_weights = _init_value(self.init_lora_weights)
        problems = list(self._problems()) + list(_variant_problems(self))
        if problems:
            raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(problems))

    def _problems(self):
        positive = ("batch_size", "grad_accum", "max_length", "log_every", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                yield f"{name}={value!r}: must be a positive integer"
        for name in ("eval_every", "save_every", "score_examples", "keep_checkpoints"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                yield f"{name}={value!r}: must be 0 or a positive integer"
        for name in ("max_steps", "train_examples", "eval_examples"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                yield f"{name}={value!r}: must be a positive integer or unset"
        for name in ("skip_bad_records", "use_rslora", "use_dora", "packing", "group_by_length", "score_before", "fused_norms", "gradient_checkpointing",
                     "compile"):
            if not isinstance(getattr(self, name), bool):
                yield f"{name}={getattr(self, name)!r}: must be true or false"
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)):
            yield f"epochs={self.epochs!r}: must be a positive number"
        if not (isinstance(self.learning_rate, (int, float)) and 0 < self.learning_rate < 1):
            yield f"learning_rate={self.learning_rate!r}: must be between 0 and 1, e.g. 2e-4"
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                yield f"{name}={getattr(self, name)!r}: must be between 0 and 1"
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            yield "weight_decay and max_grad_norm must not be negative"
        if self.precision not in ("auto", "fp32", "bf16"):
            yield f"precision={self.precision!r}: must be auto, fp32 or bf16"
        if self.attention not in ATTENTION_CHOICES:
            yield f"attention={self.attention!r}: must be one of {', '.join(ATTENTION_CHOICES)}"
        if self.preset not in PRESETS:
            yield f"preset={self.preset!r}: must be one of {', '.join(PRESETS)}"
        if self.overlong not in ("truncate", "drop"):
            yield f"overlong={self.overlong!r}: must be truncate or drop"
        if self.val_file and self.val_fraction:
            yield "val_file and val_fraction: give one way to get held-out data, not both"
        if self.method not in ("lora", "adalora"):
            yield f"method={self.method!r}: must be lora or adalora"
        elif self.method == "adalora" and (self.use_dora or self.use_rslora or self.loraplus_ratio is not None
                                           or not isinstance(self.init_lora_weights, bool)):
            yield ("method=adalora: AdaLoRA has its own scale and initialisation; leave use_dora, use_rslora, "
                   "loraplus_ratio and init_lora_weights at their defaults")

    def lora_config(self) -> LoraConfig:
        """The adapter: the preset, with r / lora_alpha / lora_dropout / targets overridden."""
        overrides: dict[str, Any] = {"task_type": "CAUSAL_LM", "use_rslora": self.use_rslora,
                                     "use_dora": self.use_dora, "init_lora_weights": self.init_lora_weights,
                                     "base_model_name_or_path": self.model}
        for name in ("r", "lora_alpha", "lora_dropout", "target_modules"):
            if getattr(self, name) is not None:
                overrides[name] = getattr(self, name)
        if self.r is not None and self.lora_alpha is None:
            overrides["lora_alpha"] = self.r  # alpha = rank unless said otherwise
        return preset(self.preset, **overrides)

    def adapter_config(self, total_steps: int) -> LoraConfig:
        """The adapter ``method`` trains: `lora_config()`, or for adalora an `AdaLoraConfig` with its
        targets, lora_alpha and dropout and target_r = r, init_r = ceil(1.5 r), total_step = the
        run's optimizer steps, tinit = 10% of them, tfinal = 20%, deltaT = max(1, steps // 100)."""
        lora = self.lora_config()
        if self.method == "lora":
            return lora
        from lorakit.variants.adalora import AdaLoraConfig

        return AdaLoraConfig(
            task_type=lora.task_type, base_model_name_or_path=lora.base_model_name_or_path,
            target_modules=lora.target_modules, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
            target_r=lora.r, init_r=math.ceil(1.5 * lora.r), total_step=total_steps,
            tinit=total_steps // 10, tfinal=total_steps // 5, deltaT=max(1, total_steps // 100),
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# init_lora_weights values the trainer accepts (pissa_niter_N: N a positive integer).
INIT_CHOICES = ("true", "false", "gaussian", "pissa", "pissa_niter_N", "olora")


def _init_value(value: Any) -> Any:
    """YAML and the command line give "true" / "false" as text; the adapter wants a bool."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _variant_problems(config: TrainConfig):
    init = config.init_lora_weights
    if not (isinstance(init, bool) or init in ("gaussian", "pissa", "olora")
            or (isinstance(init, str) and re.fullmatch(r"pissa_niter_[1-9]\d*", init))):
        yield f"init_lora_weights={init!r}: must be one of {', '.join(INIT_CHOICES)}"
    ratio = config.loraplus_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not math.isfinite(ratio) or ratio <= 0):
        yield f"loraplus_ratio={ratio!r}: must be a positive number (LoRA+ suggests 16), or unset for plain LoRA"


def variant_summary(config: TrainConfig) -> str:
    """The LoRA variant a run trains, in words: "LoRA", or e.g. "DoRA, rsLoRA, init pissa, LoRA+ ratio 16"."""
    parts = (["AdaLoRA"] if config.method == "adalora" else []) + (["DoRA"] if config.use_dora else []) \
        + (["rsLoRA"] if config.use_rslora else [])
    if config.init_lora_weights is not True:
        parts.append(f"init {str(config.init_lora_weights).lower()}")
    if config.loraplus_ratio is not None:
        parts.append(f"LoRA+ ratio {config.loraplus_ratio:g}")
    return ", ".join(parts) or "LoRA"


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (None values are skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of field: value")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; known options: {sorted(known)}")
    return TrainConfig(**values)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string right after each field), so that
    `--help` text and the documentation come from one place."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs
