"""`TrainConfig`: everything a training run needs, as one dataclass that is also `config.yaml`.

The adapter is a `LoraConfig` (``TrainConfig(lora=LoraConfig(...))``), validated by LoraConfig
alone. The command line and config.yaml give it as flat settings (`AdapterSettings`: a preset, r,
lora_alpha, ...), which `TrainConfig.from_settings` turns into that LoraConfig. A run is
re-runnable from its saved `config.yaml`: ``lorakit train --config runs/X/config.yaml``.
Command-line flags override the file; the file overrides the defaults.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from lorakit.checks import QUANTIZATIONS, STRATEGIES, is_int, is_number, shown
from lorakit.config import LoraConfig
from lorakit.data.records import RECORD_FIELDS, SHAPES, data_field_map
from lorakit.errors import ConfigError
from lorakit.models.load import DEFAULT_MODEL
from lorakit.train.fast import ATTENTION_CHOICES
from lorakit.train.adapter_settings import AdapterSettings, adapter_from, starting_adapter
from lorakit.train.methods import LOSS_TYPES, TRAIN_METHODS, TrainMethod, loss_types, variant_summary
from lorakit.train.tracking import report_targets, report_to_problem
from lorakit.variants import inits

__all__ = ["TrainConfig", "AdapterSettings", "TrainMethod", "TRAIN_METHODS", "load_train_config",
           "setting_names", "field_docs", "variant_summary"]


@dataclass
class TrainConfig:
    """A LoRA fine-tuning run. Defaults: the embedded model, task-api, the balanced preset."""

    # --- what to train on
    model: str = DEFAULT_MODEL
    """An embedded model name, a local HF model directory, or a .gguf file."""
    data: str = "task-api"
    """A built-in dataset; a .jsonl, .json, .csv, .tsv or .parquet file; a datasets save_to_disk
    directory (DIR:SPLIT for one split); or a dataset in the local datasets cache by name (offline).
    Records: text, prompt/completion, messages, Alpaca or ShareGPT (for dpo and orpo: task-api-prefs
    or prompt/chosen/rejected records)."""
    val_file: Optional[str] = None
    """Held-out data, in any form --data takes (a dataset with splits: its validation or test
    split); else val_fraction of the training data; else the built-in split."""
    val_fraction: float = 0.0
    train_examples: Optional[int] = None
    """Use only the first N training examples (after the seeded shuffle); None: all."""
    max_length: int = 512
    """Examples longer than this many tokens are truncated or dropped (see overlong)."""
    overlong: str = "truncate"
    skip_bad_records: bool = False
    """Skip and count bad records instead of stopping at the first one."""
    data_format: Optional[str] = None
    """Read every record as this shape: text, completion, chat, alpaca or sharegpt; unset: each
    record's shape from its fields."""
    data_fields: Optional[list[str]] = None
    """FIELD=COLUMN pairs: read the file's column COLUMN as the record field FIELD (e.g.
    prompt=question completion=answer)."""

    # --- the adapter
    lora: LoraConfig = field(default_factory=lambda: AdapterSettings().lora_config())
    """The adapter's configuration, validated by `LoraConfig` itself. The command line and
    config.yaml give it as flat settings (`AdapterSettings`: a preset, r, lora_alpha, ...)."""
    method: str = "lora"
    """lora, adalora (AdaLoRA: each layer starts at rank ceil(1.5 r) and is pruned by importance to
    r on average; warm-up 10% of the steps, the last 20% at the final ranks, a reallocation every
    max(1, steps // 100) steps; the adapter is saved PEFT's way, with its rank_pattern), or
    preference tuning on prompt/chosen/rejected pairs: dpo (the reference model is the same model
    with the adapter disabled, or the adapter it started from) or orpo (no reference)."""
    init_adapter: Optional[str] = None
    """Start from this adapter directory (e.g. runs/X/adapter, an SFT run's) instead of a fresh
    adapter; its settings are the run's. DPO keeps a frozen copy of it as the reference."""
    beta: float = 0.1
    """DPO: how far the policy may move from the reference (higher: less); ORPO: the weight of
    the odds-ratio term. TRL's default."""
    loss_type: Union[str, list[str]] = "sigmoid"
    """DPO's loss: sigmoid (DPO), ipo, hinge, robust (with label_smoothing) or sft (the NLL of the
    chosen answers); several (e.g. sigmoid sft: DPO with an NLL term, RPO) are summed, as in TRL."""
    loss_weights: Optional[list[float]] = None
    """The weight of each loss_type when there are several; unset: 1 each."""
    label_smoothing: float = 0.0
    """loss_type robust: the assumed probability that a pair's preference is flipped, in [0, 0.5)."""
    reference_free: bool = False
    """DPO without a reference model (its log-probabilities taken as 0)."""
    loraplus_ratio: Optional[float] = None
    """LoRA+: B trains at learning_rate x this ratio (e.g. 16), A at learning_rate; unset: plain AdamW."""

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
    quantize: Optional[str] = None
    """Store the frozen base's linear layers in 4 or 8 bits (QLoRA, with bitsandbytes): nf4, fp4 or
    int8; the adapter trains in full precision. Unset: the base in the run's precision."""
    attention: str = "auto"
    """auto (lorakit's training attention for Llama-family models, else the model's own),
    lorakit, sdpa or eager."""
    fused_norms: bool = True
    """Run Llama-style RMSNorm layers as one fused autograd node (same outputs, fewer passes)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer in the backward: much less activation memory, ~1/3 more compute."""
    compile: bool = False
    """torch.compile the decoder layers: for GPUs; on a CPU it compiles for 20-40 s and runs no faster."""
    strategy: str = "ddp"
    """With several processes (torchrun, or --nproc N): ddp (each holds the whole frozen model; only
    the adapter's gradients are exchanged) or fsdp (FSDP2: the frozen weights sharded across the
    processes too, for a model that does not fit one device). One process ignores it."""

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
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that also record the run: tensorboard, mlflow, trackio; several
    comma-separated (tensorboard,mlflow); none: no tracker. See docs/TRACKING.md."""
    tracking_uri: Optional[str] = None
    """report_to mlflow: the tracking server (e.g. http://127.0.0.1:5000); unset: run_dir/mlruns."""

    extra: dict = field(default_factory=dict)
    """Free-form notes carried into the report (e.g. the command that started the run)."""

    def __post_init__(self) -> None:
        self.report_to = report_targets(self.report_to)  # e.g. "tensorboard,mlflow" from the command line
        problems = list(self._problems())
        if problems:
            raise ConfigError("invalid training configuration:\n  - " + "\n  - ".join(problems))

    @classmethod
    def from_settings(cls, **settings: Any) -> "TrainConfig":
        """A TrainConfig from flat settings, as the command line, config.yaml and tests give them:
        `AdapterSettings` fields (preset, r, lora_alpha, ...) build ``lora``; a ``lora`` mapping
        (a run's config.yaml) or LoraConfig is the adapter they override; the rest are fields.
        Every problem, the adapter's and the run's, is reported in one ConfigError."""
        adapter_names = {f.name for f in dataclasses.fields(AdapterSettings)}
        flat = {k: v for k, v in settings.items() if k in adapter_names}
        fields = {k: v for k, v in settings.items() if k not in adapter_names}
        problems = []
        try:
            init = fields.get("init_adapter")
            if isinstance(init, str) and init and fields.get("lora") is None:
                given = sorted(k for k, v in flat.items() if v is not None)
                if given:  # the adapter's shape is the starting adapter's
                    raise ConfigError(f"init_adapter={init}: the adapter's settings come from it; drop "
                                      f"{', '.join(given)}")
                fields["lora"], flat = starting_adapter(init), {}
            fields["lora"] = adapter_from(fields.get("lora"), flat)
        except ConfigError as err:
            problems.append(str(err))
            fields["lora"] = AdapterSettings().lora_config()  # the rest is still checked
        try:
            config = cls(**fields)
        except ConfigError as err:
            problems.append(str(err))
        if problems:
            raise ConfigError("\n".join(problems))
        return config

    def _problems(self):
        """One message per invalid field, each naming it; every field is type-checked, so a
        config.yaml value of the wrong kind is a ConfigError, never a TypeError later."""
        if not isinstance(self.lora, LoraConfig):
            yield f"lora={shown(self.lora)}: must be a LoraConfig (TrainConfig.from_settings reads flat settings)"
        for name in ("model", "data", "output_dir", "name"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                yield f"{name}={shown(value)}: must be a non-empty string"
        for name in ("val_file", "run_dir", "init_adapter"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                yield f"{name}={shown(value)}: must be a path (a non-empty string) or unset"
        if problem := report_to_problem(self.report_to):
            yield f"report_to={shown(self.report_to)}: {problem}"
        if self.tracking_uri is not None and (not isinstance(self.tracking_uri, str) or not self.tracking_uri):
            yield f"tracking_uri={shown(self.tracking_uri)}: must be an MLflow tracking URI (a string) or unset"
        elif self.tracking_uri and isinstance(self.report_to, list) and "mlflow" not in self.report_to:
            yield f"tracking_uri={self.tracking_uri}: MLflow's server; add mlflow to report_to (--report-to mlflow)"
        if not isinstance(self.extra, dict):
            yield f"extra={shown(self.extra)}: must be a mapping of notes"
        positive = ("batch_size", "grad_accum", "max_length", "log_every", "max_new_tokens")
        for name in positive:
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                yield f"{name}={shown(value)}: must be a positive integer"
        for name in ("eval_every", "save_every", "score_examples", "keep_checkpoints"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                yield f"{name}={shown(value)}: must be 0 or a positive integer"
        for name in ("max_steps", "train_examples", "eval_examples"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                yield f"{name}={shown(value)}: must be a positive integer or unset"
        if not is_int(self.seed) or not 0 <= self.seed < 2**32:
            yield f"seed={shown(self.seed)}: must be an integer from 0 to 2**32 - 1"
        for name in ("skip_bad_records", "packing", "group_by_length", "score_before", "fused_norms",
                     "gradient_checkpointing", "compile", "reference_free"):
            if not isinstance(getattr(self, name), bool):
                yield f"{name}={shown(getattr(self, name))}: must be true or false"
        if not (is_number(self.epochs) and self.epochs > 0 and math.isfinite(self.epochs)):
            yield f"epochs={shown(self.epochs)}: must be a positive number"
        if not (is_number(self.learning_rate) and 0 < self.learning_rate < 1):
            yield f"learning_rate={shown(self.learning_rate)}: must be between 0 and 1, e.g. 2e-4"
        for name in ("warmup_ratio", "min_lr_ratio"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value <= 1):
                yield f"{name}={shown(value)}: must be a number between 0 and 1"
        if not (is_number(self.val_fraction) and 0 <= self.val_fraction < 1):
            yield f"val_fraction={shown(self.val_fraction)}: must be a number in [0, 1), e.g. 0.1"
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not (is_number(value) and 0 <= value and math.isfinite(value)):
                yield f"{name}={shown(value)}: must be a finite number >= 0"
        for name, choices in (("precision", ("auto", "fp32", "bf16")), ("attention", ATTENTION_CHOICES),
                              ("overlong", ("truncate", "drop")), ("strategy", STRATEGIES)):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                yield f"{name}={shown(value)}: must be one of {', '.join(choices)}"
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            yield f"quantize={shown(self.quantize)}: must be one of {', '.join(QUANTIZATIONS)}, or unset"
        if self.data_format is not None and (not isinstance(self.data_format, str) or self.data_format not in SHAPES):
            yield f"data_format={shown(self.data_format)}: must be one of {', '.join(SHAPES)}, or unset"
        if self.data_fields is not None and data_field_map(self.data_fields) is None:
            yield (f"data_fields={shown(self.data_fields)}: must be FIELD=COLUMN pairs with FIELD one of "
                   f"{', '.join(RECORD_FIELDS)}, each field once (e.g. prompt=question completion=answer)")
        if (self.data_format or self.data_fields) and TRAIN_METHODS.get(self.method, TRAIN_METHODS["lora"]).preference:
            yield f"data_format / data_fields: describe supervised records; method {self.method} reads preference pairs"
        if self.val_file and is_number(self.val_fraction) and self.val_fraction:
            yield "val_file and val_fraction: give one way to get held-out data, not both"
        ratio = self.loraplus_ratio
        if ratio is not None and (not is_number(ratio) or not math.isfinite(ratio) or ratio <= 0):
            yield f"loraplus_ratio={shown(ratio)}: must be a positive number (LoRA+ suggests 16), or unset for plain LoRA"
        yield from self._method_problems()

    def _method_problems(self):
        method = TRAIN_METHODS.get(self.method) if isinstance(self.method, str) else None
        if method is None:
            yield f"method={shown(self.method)}: must be one of {', '.join(TRAIN_METHODS)}"
            return
        if self.loraplus_ratio is not None and not method.loraplus:
            yield f"method={self.method}: LoRA+ does not apply to it; leave loraplus_ratio unset"
        yield from self._preference_problems(method)
        if isinstance(self.lora, LoraConfig):
            try:  # the method's own config checks the adapter settings (a nominal step count)
                steps = self.max_steps if is_int(self.max_steps) and self.max_steps > 0 else 100
                method.adapter(self.lora, steps)
            except ConfigError as err:
                yield f"method={self.method}: the adapter settings do not fit it: {err}"

    def _preference_problems(self, method: TrainMethod):
        if not (is_number(self.beta) and math.isfinite(self.beta) and self.beta > 0):
            yield f"beta={shown(self.beta)}: must be a positive number (TRL's default is 0.1)"
        losses = loss_types(self.loss_type)
        if losses is None:
            yield (f"loss_type={shown(self.loss_type)}: must be one of {', '.join(LOSS_TYPES)}, or a list of "
                   "different ones")
            losses = []
        elif losses != ["sigmoid"] and self.method != "dpo":
            yield f"loss_type={self.loss_type}: DPO's losses; they apply to method dpo only"
        weights = self.loss_weights
        if weights is not None and not (isinstance(weights, list) and len(weights) == len(losses) and
                                        all(is_number(w) and math.isfinite(w) and w >= 0 for w in weights)):
            yield (f"loss_weights={shown(weights)}: must be one number >= 0 per loss_type "
                   f"({len(losses)}: {', '.join(losses) or 'none'}), or unset")
        smoothing = self.label_smoothing
        if not (is_number(smoothing) and 0 <= smoothing < 0.5):
            yield f"label_smoothing={shown(smoothing)}: must be a number in [0, 0.5)"
        elif smoothing and "robust" not in losses:
            yield (f"label_smoothing={smoothing:g}: it is used by loss_type robust only (as in TRL); set "
                   f"loss_type robust, or leave label_smoothing 0")
        if self.reference_free is True and self.method != "dpo":
            yield "reference_free: applies to method dpo only (ORPO has no reference model)"
        if method.preference and isinstance(self.lora, LoraConfig) and inits.uses_base_weight(self.lora.init_lora_weights):
            yield (f"method={self.method} with init_lora_weights={self.lora.init_lora_weights}: PiSSA/OLoRA rewrite the "
                   "base weights, so the model with its adapter disabled is no longer the reference; use the "
                   "default init")
        if self.init_adapter is not None and not method.preference and self.method != "lora":
            yield f"init_adapter: starts a lora, dpo or orpo run, not {self.method}"

    @property
    def peft_type(self) -> str:
        """The peft_type of the adapter this run trains (`lorakit.methods`)."""
        return TRAIN_METHODS[self.method].peft_type

    def adapter_config(self, total_steps: int) -> LoraConfig:
        """The adapter ``method`` trains over ``total_steps`` optimizer steps, on ``model``."""
        lora = self.lora
        if lora.base_model_name_or_path is None:
            lora = dataclasses.replace(lora, base_model_name_or_path=self.model)
        return TRAIN_METHODS[self.method].adapter(lora, total_steps)

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``lora`` as the LoraConfig fields that differ from their defaults (what
        config.yaml holds; `from_settings` reads it back)."""
        defaults = LoraConfig().to_dict()
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lora"] = {k: v for k, v in self.lora.to_dict().items() if v != defaults[k]}
        out["extra"] = dict(self.extra)
        return out

    def save(self, path: str | Path) -> None:
        """Write the YAML file atomically (a temporary file beside it, then a rename): a kill
        leaves the old file or the new one, never part of one."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def setting_names() -> list[str]:
    """Every flat setting `from_settings` and `load_train_config` take (the command-line flags):
    TrainConfig's fields but ``lora`` and ``extra``, then `AdapterSettings`'."""
    own = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("lora", "extra")]
    return own + [f.name for f in dataclasses.fields(AdapterSettings)]


def load_train_config(path: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """Defaults, then the YAML file at ``path`` (a run's config.yaml, or flat settings), then
    ``overrides`` (None values are skipped)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        except RecursionError:
            raise ConfigError(f"{path}: nested too deeply; config.yaml is a mapping of field: value") from None
        except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. an integer too long to convert
            raise ConfigError(f"{path}: not valid YAML ({shown(str(err))})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: must be a mapping of field: value, not a {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = set(setting_names()) | {"lora", "extra"}
    unknown = sorted(shown(k) if not isinstance(k, str) else k for k in values if k not in known)
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; known options: {sorted(known)}")
    return TrainConfig.from_settings(**values)


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string right after each field), so that
    `--help` text and the documentation come from one place."""
    tree = ast.parse(inspect.getsource(cls))
    body = next(node for node in tree.body if isinstance(node, ast.ClassDef)).body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs
