"""Merge an adapter into its base model and write a plain transformers model directory.

``merge_adapter(adapter_dir, out_dir)`` loads the base model in fp32, adds each LoRA layer's
update into its base weight (``W + dW``, with ``dW = scale * B @ A`` for plain LoRA: whatever
the adapter's forward adds, see `lorakit.layer`), casts the model to the output dtype and saves
it with the tokenizer: ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` then gives
the adapted model's outputs without lorakit or PEFT.

Rounding. In fp32 the merge is exact to fp32 rounding. In bf16 (8 significant bits) or fp16
(11) a small update can vanish: ``round(W + dW)`` is ``round(W)`` whenever ``|dW|`` is under
half the spacing of representable numbers around ``W`` (about ``|W| * 2**-8`` in bf16). For a
merge into those dtypes `rounding_loss` measures, per layer,

- relative error: ``||round(W + dW) - round(W) - dW|| / ||dW||`` (Frobenius norms), how far the
  update the stored weights carry (``round(W + dW) - round(W)``) is from the update the fp32
  merge applied (``dW = (W + dW)_fp32 - W``): 0 when it survives, 1 when it is entirely lost,
  above 1 when the rounding adds more than it keeps (a base weight that is not representable in
  the dtype and sits near a rounding boundary jumps a whole step for a tiny update);
- lost fraction: of the elements the update changes (``dW != 0``), the share where
  ``round(W + dW) == round(W)``.

The totals pool every layer (errors and updates summed in square before the root), so large
layers weigh more. Measuring against ``round(W)`` isolates the update: the base's own rounding
is what any bf16 copy of the base model has too.

An adapter trained on a quantized base (QLoRA: its file records "nf4", "fp4" or "int8") learned
to correct the quantized weights, not the original ones. Its base is loaded quantized as in
training, then dequantized (`lorakit.models.quantized.dequantize_model`), and the update is merged
into those weights in fp32; the written model is checked against the quantized model with the
adapter on a few probe texts (`QuantizedCheck`: logit error and top-1 agreement).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from lorakit.errors import ConfigError, LorakitError
from lorakit.inject import lora_layers
from lorakit.models.adapters import base_model_for, load_adapted
from lorakit.models.load import parse_dtype, resolve_model_dir
from lorakit.models.quantized import base_quantization, dequantize_model

__all__ = ["merge_adapter", "merge_into_base", "Merged", "MergeReport", "RoundingReport", "LayerRounding", "rounding_loss", "QuantizedCheck",
           "check_out_dir", "write_atomically",
           "WARN_RELATIVE_ERROR", "WARN_LOST_FRACTION"]

# A merge warns when at least this much of the update is gone (relative error, pooled) ...
WARN_RELATIVE_ERROR = 0.2
# ... or when at least this share of the changed elements kept their base value.
WARN_LOST_FRACTION = 0.25

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class LayerRounding:
    """How much of one layer's update survives rounding to ``dtype`` (see the module docstring)."""

    name: str
    changed: int  # elements with dW != 0
    lost: int  # of those, elements where round(W + dW) == round(W)
    update_norm: float  # ||dW||
    error_norm: float  # ||round(W + dW) - round(W) - dW||

    @property
    def relative_error(self) -> float:
        return self.error_norm / self.update_norm if self.update_norm else 0.0

    @property
    def lost_fraction(self) -> float:
        return self.lost / self.changed if self.changed else 0.0


def rounding_loss(name: str, base: torch.Tensor, merged: torch.Tensor, dtype: torch.dtype) -> LayerRounding:
    """Measure what rounding ``merged`` (the fp32 ``W + dW``) to ``dtype`` does to the update
    ``dW = merged - base``, relative to the rounded base ``round(base)``."""
    base, merged = base.detach().float(), merged.detach().float()
    update = merged - base  # dW, the update the fp32 merge applied
    kept = merged.to(dtype).float() - base.to(dtype).float()  # round(W + dW) - round(W)
    changed = update != 0
    return LayerRounding(
        name=name,
        changed=int(changed.sum()),
        lost=int((changed & (kept == 0)).sum()),
        update_norm=float(torch.linalg.vector_norm(update)),
        error_norm=float(torch.linalg.vector_norm(kept - update)),
    )


@dataclass
class RoundingReport:
    """Per-layer and pooled rounding loss of a merge into bf16 or fp16."""

    dtype: str
    layers: list[LayerRounding]

    @property
    def relative_error(self) -> float:
        """sqrt(sum of squared layer errors) / sqrt(sum of squared layer update norms)."""
        update = sum(l.update_norm ** 2 for l in self.layers) ** 0.5
        error = sum(l.error_norm ** 2 for l in self.layers) ** 0.5
        return error / update if update else 0.0

    @property
    def lost_fraction(self) -> float:
        changed = sum(l.changed for l in self.layers)
        return sum(l.lost for l in self.layers) / changed if changed else 0.0

    def worst(self, k: int = 5) -> list[LayerRounding]:
        """The ``k`` layers with the largest relative error."""
        return sorted(self.layers, key=lambda l: -l.relative_error)[:k]

    def warning(self) -> str | None:
        """A one-line warning when a large share of the update is lost, else None."""
        if self.relative_error < WARN_RELATIVE_ERROR and self.lost_fraction < WARN_LOST_FRACTION:
            return None
        return (f"WARNING: rounding to {self.dtype} leaves {self.lost_fraction:.1%} of the changed weights at "
                f"their base value, and the update the weights carry is off by {self.relative_error:.1%} of its "
                f"norm (relative error); the merged model may not behave like the adapter. Merge with --dtype "
                f"fp32, or keep the adapter separate (lorakit generate --adapter)")

    def summary(self, top: int = 5) -> str:
        lines = [f"rounding to {self.dtype}: {len(self.layers)} layers, relative error "
                 f"{self.relative_error:.2%}, lost {self.lost_fraction:.2%} of changed elements",
                 f"  {'layer (largest error first)':<48} {'rel. error':>10} {'lost':>8} {'||dW||':>10}"]
        for l in self.worst(top):
            lines.append(f"  {l.name:<48} {l.relative_error:>10.2%} {l.lost_fraction:>8.2%} {l.update_norm:>10.4g}")
        warning = self.warning()
        return "\n".join(lines + ([warning] if warning else []))

    def as_dict(self) -> dict:
        return {"dtype": self.dtype, "relative_error": self.relative_error, "lost_fraction": self.lost_fraction,
                "layers": [{"name": l.name, "changed": l.changed, "lost": l.lost, "update_norm": l.update_norm,
                            "error_norm": l.error_norm, "relative_error": l.relative_error,
                            "lost_fraction": l.lost_fraction} for l in self.layers]}


# Texts the merged model of a quantized base is checked on (any text will do: the check compares
# two models' next-token logits at every position)
PROBE_TEXTS = (
    "Add a task: email Sam the budget numbers by Friday, high priority.",
    "The quick brown fox jumps over the lazy dog, then rests in the shade.",
    "def merge(a, b):\n    return sorted(a + b)\n",
)


@dataclass(frozen=True)
class QuantizedCheck:
    """How the model merged from a quantized base's adapter compares with that quantized model
    running the adapter: next-token logits at every position of `PROBE_TEXTS`."""

    precision: str
    """The base's quantization the adapter was trained on."""
    positions: int
    max_logit_error: float
    mean_logit_error: float
    top1_agreement: float
    """The share of positions where both predict the same next token."""

    def summary(self, dtype: str) -> str:
        return (f"trained on the {self.precision} base: merged into its dequantized weights in fp32; against the "
                f"{self.precision} model with the adapter, the {dtype} merged model's logits differ by at most "
                f"{self.max_logit_error:.3g} (mean {self.mean_logit_error:.3g}) over {self.positions} probe "
                f"positions, and its next token agrees at {self.top1_agreement:.1%} of them")

    def as_dict(self) -> dict:
        return {"precision": self.precision, "positions": self.positions, "max_logit_error": self.max_logit_error,
                "mean_logit_error": self.mean_logit_error, "top1_agreement": self.top1_agreement}


def _probe_logits(model: nn.Module, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids).logits[0].float() for ids in probes]  # (T, V) each


def _compare(precision: str, reference: list[torch.Tensor], merged: list[torch.Tensor]) -> QuantizedCheck:
    ref, out = torch.cat(reference), torch.cat(merged)  # (positions, V)
    error = (out - ref).abs()
    return QuantizedCheck(precision=precision, positions=ref.shape[0], max_logit_error=float(error.max()),
                          mean_logit_error=float(error.mean()),
                          top1_agreement=float((out.argmax(-1) == ref.argmax(-1)).float().mean()))


@dataclass
class MergeReport:
    """What `merge_adapter` wrote."""

    out_dir: Path
    adapter_dir: Path
    base_model: str
    dtype: str
    merged_layers: int
    files: list[str]
    untied: list[str] = field(default_factory=list)
    """LoRA layers whose weight was shared with another (tied embeddings) and was given its own copy."""
    rounding: RoundingReport | None = None
    """None for an fp32 merge."""
    quantized: QuantizedCheck | None = None
    """For an adapter trained on a quantized base: the merged model against that base with the adapter."""

    def summary(self) -> str:
        lines = [f"merged {self.merged_layers} LoRA layers of {self.adapter_dir} into {self.base_model} ({self.dtype})",
                 f"wrote {self.out_dir}: {', '.join(self.files)}"]
        if self.untied:
            lines.append(f"untied from shared weights (the update applies to these only): {', '.join(self.untied)}")
        if self.quantized is not None:
            lines.append(self.quantized.summary(self.dtype))
        if self.rounding is not None:
            lines.append(self.rounding.summary())
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "adapter_dir": str(self.adapter_dir), "base_model": self.base_model,
                "dtype": self.dtype, "merged_layers": self.merged_layers, "files": self.files,
                "untied": self.untied, "rounding": self.rounding.as_dict() if self.rounding else None,
                "quantized": self.quantized.as_dict() if self.quantized else None}


def merge_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, model: str | None = None,
                  dtype: str | torch.dtype | None = None, *, force: bool = False,
                  max_shard_size: str | int | None = None) -> MergeReport:
    """Merge the adapter in ``adapter_dir`` into its base model (``model``, else the adapter's
    ``base_model_name_or_path``) and write the full model to ``out_dir``.

    ``dtype`` is the saved weights' dtype (fp32, bf16 or fp16; default: the base model's own, from
    its config.json, else fp32); for bf16 and fp16 the report measures the rounding loss. The
    directory is written under a temporary name next to ``out_dir`` and renamed into place; a
    non-empty ``out_dir`` is replaced only with ``force``. Weights are safetensors, sharded as
    transformers does (``max_shard_size``, transformers' default when None). An adapter trained
    on a quantized base is merged into that base's dequantized weights (see the module docstring).
    """
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    base_name = base_model_for(adapter_dir, model)
    base_dir = resolve_model_dir(base_name)
    check_out_dir(out_dir, force, protected=[adapter_dir, base_dir])
    target = parse_dtype(dtype) if dtype is not None else _saved_dtype(base_dir)
    if target not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {dtype!r} cannot be merged into; use fp32, bf16 or fp16")

    merged = merge_into_base(adapter_dir, base_dir, target)
    files = write_atomically(out_dir, lambda tmp: _save(merged.model, merged.tokenizer, tmp, max_shard_size))
    return MergeReport(out_dir, adapter_dir, str(base_name), _DTYPE_NAMES[target], merged.layers, files,
                       merged.untied, merged.rounding, merged.quantized)


@dataclass
class Merged:
    """An adapter merged into its base, in memory (`merge_into_base`)."""

    model: nn.Module
    """The plain transformers model, in the target dtype."""
    tokenizer: Any
    layers: int
    """How many LoRA layers were merged."""
    untied: list[str]
    rounding: RoundingReport | None
    quantized: QuantizedCheck | None


def merge_into_base(adapter_dir: Path, base_dir: Path, target: torch.dtype = torch.float32) -> Merged:
    """The adapter merged into the base in ``base_dir`` as `merge_adapter` merges it (in fp32, into the
    dequantized base for a quantized base's adapter, shared weights untied), cast to ``target``
    (fp32, bf16 or fp16)."""
    precision = base_quantization(adapter_dir)
    peft_model, tokenizer = load_adapted(adapter_dir, model=base_dir, dtype=torch.float32, quantize=precision)
    probes, reference = [], []
    if precision is not None:  # the quantized model's own outputs, then its weights as it computes with them
        probes = [torch.tensor([tokenizer(text)["input_ids"]]) for text in PROBE_TEXTS]
        reference = _probe_logits(peft_model, probes)
        dequantize_model(peft_model)
    layers = [(name, layer) for name, layer in lora_layers(peft_model.get_base_model())]
    untied = _untie_shared_weights(peft_model.get_base_model(), layers)
    before = {name: layer.base_layer.weight.detach().clone() for name, layer in layers} \
        if target != torch.float32 else {}
    merged = peft_model.merge_and_unload()
    rounding = None
    if before:
        rounding = RoundingReport(_DTYPE_NAMES[target], [
            rounding_loss(name, before.pop(name), layer.base_layer.weight, target) for name, layer in layers])
    merged = merged.to(target)
    _check_finite(merged, target)
    quantized = _compare(precision, reference, _probe_logits(merged, probes)) if precision else None
    return Merged(merged, tokenizer, len(layers), untied, rounding, quantized)


def _saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's config.json names (``dtype`` or the older ``torch_dtype``)."""
    config = json.loads((model_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    try:
        return parse_dtype(name)
    except ConfigError:
        return torch.float32


def check_out_dir(out_dir: Path, force: bool, protected: list[Path]) -> None:
    resolved = out_dir.resolve()
    for path in protected:
        if resolved == path.resolve():
            raise ConfigError(f"--out {out_dir} is the adapter or base model directory; pick a new directory")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ConfigError(f"--out {out_dir} is not empty; pick another directory or pass --force to replace it")


def _untie_shared_weights(model: nn.Module, layers) -> list[str]:
    """Give each LoRA layer whose base weight is shared (tied input and output embeddings) its own
    copy, so the merged update lands in that layer only, and record the untying in the config."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    untied = []
    for name, layer in layers:
        weight = layer.base_layer.weight
        if owners.get(id(weight), 0) > 1:
            layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
            untied.append(name)
    if untied:
        for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
            config.tie_word_embeddings = False
    return untied


def _check_finite(model: nn.Module, dtype: torch.dtype) -> None:
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise LorakitError(f"the merged weights are not finite in {dtype} ({', '.join(bad[:5])}"
                           f"{' ...' if len(bad) > 5 else ''}); fp16 overflows above 65504: merge with --dtype bf16 "
                           "or fp32, or check the adapter with `lorakit inspect`")


def _save(model: nn.Module, tokenizer, directory: Path, max_shard_size) -> None:
    options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **options)
    tokenizer.save_pretrained(directory)


def write_atomically(out_dir: Path, write) -> list[str]:
    """Run ``write(tmp)`` on a temporary directory beside ``out_dir``, then rename it into place
    (an existing ``out_dir`` is moved aside first and removed after). Returns the file names."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.merging-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the model private to its writer
    try:
        write(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        old = None
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "dir")
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return files
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
