"""Which modules a LoRA configuration adapts, at which rank and scale: matched on names alone.

The rules are lorakit's (which are PEFT's, minus its traps; see DESIGN.md section 3):

- ``target_modules`` as a list matches a module whose full name equals an entry or ends with
  ``"." + entry``; as a string it is a regular expression that must match the whole name;
  ``"all-linear"`` is every Linear/Conv1D layer except the output head; ``None`` is PEFT's
  default for the model type. A list entry that matches nothing is an error.
- ``exclude_modules`` removes matches (same list / regex rules); ``layers_to_transform``
  (with ``layers_pattern``) keeps only modules in those block indices.
- ``rank_pattern`` / ``alpha_pattern`` keys match a dot-separated tail of the name; where several
  match, the most specific wins (the longest matched tail, then the longest key), so the answer
  does not depend on dict order. For non-overlapping patterns this is exactly PEFT's result.
- The scale is ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

from lorakit.errors import ConfigError
from lorakit.inject import layer_index_ok, name_matches, pattern_value
from lorakit.plan.shapes import ModelShape, ModuleShape

__all__ = ["LoraSpec", "TargetedModule", "resolve_targets", "pattern_value"]


@dataclass(frozen=True)
class LoraSpec:
    """The fields of a LoraConfig that decide what LoRA costs (PEFT's names and defaults)."""

    r: int = 8
    lora_alpha: float = 8
    target_modules: tuple[str, ...] | str | None = None
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False

    def __post_init__(self) -> None:
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, (list, set, frozenset)):
                object.__setattr__(self, name, tuple(sorted(value) if isinstance(value, (set, frozenset)) else value))
        problems = []
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            problems.append(f"r={self.r!r}: the rank must be a positive integer")
        if not isinstance(self.lora_alpha, (int, float)) or not self.lora_alpha > 0:
            problems.append(f"lora_alpha={self.lora_alpha!r}: must be a positive number")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"lora_dropout={self.lora_dropout!r}: must be in [0, 1)")
        for key, value in self.rank_pattern.items():
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                problems.append(f"rank_pattern[{key!r}]={value!r}: must be a positive integer")
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            problems.append("layers_to_transform cannot be combined with a string target_modules "
                            "(a regular expression or 'all-linear'); list the modules instead")
        if problems:
            raise ConfigError("invalid LoRA settings: " + "; ".join(problems))

    @classmethod
    def from_config(cls, config: Any) -> "LoraSpec":
        """From a lorakit or PEFT LoraConfig (any object with these attributes) or a dict.

        Options the planner cannot cost yet are refused rather than ignored.
        """
        get = config.get if isinstance(config, dict) else (lambda k, d=None: getattr(config, k, d))
        unsupported = [f"{k}={get(k)!r}" for k, off in
                       (("bias", "none"), ("modules_to_save", None), ("trainable_token_indices", None))
                       if get(k, off) not in (off, None, [], ())]
        if unsupported:
            raise ConfigError(f"the planner does not cost {', '.join(unsupported)} yet; plan "
                              "without them (bias='none', no modules_to_save)")
        kwargs = {f.name: get(f.name) for f in fields(cls) if get(f.name) is not None}
        return cls(**kwargs)


@dataclass(frozen=True)
class TargetedModule:
    """One module LoRA adapts: its full name, shape, rank, alpha and scale."""

    name: str
    module: ModuleShape
    r: int
    lora_alpha: float
    scale: float

    def params(self, use_dora: bool = False) -> int:
        """A (r x in) + B (out x r), plus DoRA's magnitude vector (out)."""
        return self.module.lora_params(self.r) + (self.module.out_features if use_dora else 0)


def resolve_targets(shape: ModelShape, spec: LoraSpec) -> list[TargetedModule]:
    """The modules of ``shape`` that ``spec`` adapts, in model order."""
    targets = spec.target_modules
    if targets is None:
        if not shape.default_targets:
            raise ConfigError(f"target_modules is required for model_type {shape.model_type!r} "
                              f"(PEFT has no default for it); adaptable: {_leaf_names(shape)}")
        targets = shape.default_targets
    all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
    found: list[TargetedModule] = []
    hit: set[str] = set()
    for name, module in shape.modules():
        if all_linear:
            matched = module.kind in ("linear", "conv1d") and module.group != "head"
        else:
            matched = name_matches(targets, name)
            if matched and not isinstance(targets, str):
                hit.update(e for e in targets if name == e or name.endswith("." + e))
        if not matched or (spec.exclude_modules and name_matches(spec.exclude_modules, name)):
            continue
        if not layer_index_ok(spec.layers_to_transform, spec.layers_pattern, name):
            continue
        r = pattern_value(spec.rank_pattern, name, spec.r)
        alpha = pattern_value(spec.alpha_pattern, name, spec.lora_alpha)
        scale = alpha / math.sqrt(r) if spec.use_rslora else alpha / r
        found.append(TargetedModule(name, module, r, alpha, scale))
    if not isinstance(targets, str):
        missing = sorted(set(targets) - hit)
        if missing:
            raise ConfigError(f"target_modules entries matched no module of {shape.name}: "
                              f"{missing}; its adaptable layers are named: {_leaf_names(shape)}")
    if not found:
        raise ConfigError(f"target_modules={targets!r} matched no module of {shape.name} (after "
                          f"layers_to_transform and exclude_modules); adaptable: {_leaf_names(shape)}")
    return found


def _leaf_names(shape: ModelShape) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in shape.modules()})
