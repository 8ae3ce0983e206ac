"""`AdaLoraConfig`: an AdaLoRA adapter's configuration, field for field its `adapter_config.json`.

AdaLoRA (Zhang et al. 2023, https://arxiv.org/abs/2303.10512) runs in three phases over
``total_step`` optimizer steps:

    steps 0 .. tinit                       warm-up: every layer keeps init_r triplets
    steps tinit .. total_step - tfinal     the budget (kept triplets, all layers together) falls
                                           from init_r * n to target_r * n on a cubic schedule;
                                           every deltaT steps the least important triplets are
                                           masked (their singular value set to 0)
    steps total_step - tfinal .. end       fine-tuning at the final ranks (``rank_pattern``)

Names, defaults and checks are PEFT 0.21's (`peft.AdaLoraConfig`, a `LoraConfig` subclass).
``r`` is not used (``init_r`` is the starting rank), as in PEFT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

from lorakit.checks import MAX_RANK, shown
from lorakit.config import LoraConfig

__all__ = ["AdaLoraConfig"]


@dataclass
class AdaLoraConfig(LoraConfig):
    """Configuration of one AdaLoRA adapter: ``y = W x + B (A * E) x * lora_alpha / (ranknum + 1e-5)``.

    P = B (out x r), Lambda = E (r x 1) and Q = A (r x in) are the SVD-form factors; ranknum is
    init_r. Every LoRA field applies as in PEFT's AdaLoRA: target_modules, exclude_modules,
    lora_alpha, lora_dropout, fan_in_fan_out, bias, modules_to_save, layers_to_transform; not r,
    use_rslora or alpha_pattern, which PEFT's AdaLoRA ignores too.
    """

    peft_type: Optional[str] = "ADALORA"
    target_r: int = 8
    """The average rank per adapted matrix at the end of the budget phase."""
    init_r: int = 12
    """The rank every adapted matrix starts with (what the budget falls from)."""
    tinit: int = 0
    """Warm-up steps before any triplet is masked."""
    tfinal: int = 0
    """Final steps trained at the allocated ranks, with no more reallocation."""
    deltaT: int = 1
    """Steps between two reallocations during the budget phase."""
    beta1: float = 0.85
    """EMA factor of the sensitivity |p * grad| (the smoothed importance)."""
    beta2: float = 0.85
    """EMA factor of the uncertainty |sensitivity - its EMA|."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonal regulariser on A and B added to the training loss."""
    total_step: Optional[int] = None
    """Optimizer steps of the whole run (required: the budget schedule depends on it)."""
    rank_pattern: Optional[dict] = None
    """Written by the rank allocator: {"<module>.lora_E": [bool] * init_r}, the triplets kept.
    Saved files hold only the kept triplets; loading sizes each layer by this pattern."""

    PEFT_TYPE = "ADALORA"

    def __post_init__(self) -> None:
        self.peft_type = "ADALORA" if self.peft_type in (None, "LORA") else self.peft_type
        if self.r is not None and self.r != 8:  # PEFT's warning: r is LoraConfig's field, AdaLoRA starts at init_r
            warnings.warn("AdaLoraConfig: `r` is not used by AdaLoRA and is ignored; set the starting "
                          "rank with init_r and the final average rank with target_r", stacklevel=3)
        super().__post_init__()

    def _problems(self):
        yield from super()._problems()
        for name in ("target_r", "init_r"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                yield f"{name}={shown(value)}: must be a positive integer, e.g. {name}=8"
            elif value > MAX_RANK:
                yield f"{name}={value}: ranks above {MAX_RANK:,} exceed every layer's min(in_features, out_features)"
        for name in ("tinit", "tfinal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                yield f"{name}={shown(value)}: must be 0 or a positive number of steps"
        if isinstance(self.deltaT, bool) or not isinstance(self.deltaT, int) or self.deltaT < 1:
            yield f"deltaT={shown(self.deltaT)}: must be a positive number of steps, e.g. deltaT=1"
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < 1:
                yield f"{name}={shown(value)}: an EMA factor must lie strictly between 0 and 1, e.g. 0.85"
        weight = self.orth_reg_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) \
                or weight < 0:
            yield f"orth_reg_weight={shown(weight)}: must be a number >= 0, e.g. 0.5"
        yield from self._schedule_problems()
        if isinstance(self.target_r, int) and isinstance(self.init_r, int) and self.target_r > self.init_r:
            yield (f"target_r={self.target_r} > init_r={self.init_r}: the rank budget only falls; "
                   "start higher (init_r >= target_r, e.g. init_r = 1.5 * target_r)")
        if not isinstance(self.init_lora_weights, bool):
            yield (f"init_lora_weights={shown(self.init_lora_weights)}: AdaLoRA has one initialisation: "
                   "True (E = 0, A and B ~ N(0, 0.02)) or False (all random)")
        if self.use_dora:
            yield "use_dora=True: AdaLoRA does not combine with DoRA (nor does PEFT); set use_dora=False"
        if self.use_rslora:
            yield "use_rslora=True: AdaLoRA scales by lora_alpha / init_r; set use_rslora=False"
        if self.alpha_pattern:
            yield "alpha_pattern: AdaLoRA uses one lora_alpha for every layer; leave alpha_pattern empty"

    def _schedule_problems(self):
        total = self.total_step
        if isinstance(total, bool) or not isinstance(total, int) or total <= 0:
            yield (f"total_step={shown(total)}: AdaLoRA needs the run's number of optimizer steps "
                   "(the budget schedule depends on it), e.g. total_step=1000")
        elif isinstance(self.tinit, int) and isinstance(self.tfinal, int) and self.tinit >= total - self.tfinal:
            yield (f"tinit={self.tinit}, tfinal={self.tfinal}, total_step={total}: no steps are left for "
                   "the budget phase (tinit must be < total_step - tfinal); decrease tinit or tfinal "
                   "or increase total_step")

    def _rank_pattern_problems(self):
        pattern = self.rank_pattern
        if pattern is None:
            return
        if not isinstance(pattern, dict):
            yield f"rank_pattern={shown(pattern)}: must be None or {{'<module>.lora_E': [bool, ...]}}"
            return
        for key, kept in pattern.items():
            if not isinstance(key, str) or ".lora_E" not in key:
                yield f"rank_pattern[{shown(key)}]: keys name a layer's singular values, '<module>.lora_E'"
            if not isinstance(kept, list) or not all(isinstance(k, bool) for k in kept) \
                    or (isinstance(self.init_r, int) and len(kept) > self.init_r):
                yield (f"rank_pattern[{shown(key)}]: must be a list of at most init_r={self.init_r} booleans "
                       "(True: the triplet is kept)")

    def rank_of(self, module_name: str) -> int:
        """The rank layer ``module_name`` is built with: its kept triplets in rank_pattern, else init_r."""
        kept = pattern_for(self.rank_pattern, module_name)
        return self.init_r if kept is None else sum(kept)


def pattern_for(rank_pattern: Optional[dict], module_name: str) -> Optional[list[bool]]:
    """The rank_pattern entry of ``module_name``: key "<module>.lora_E" (what PEFT saves) or
    "<module>.lora_E.<adapter>" (PEFT's form in memory); None when there is none."""
    for key, kept in (rank_pattern or {}).items():
        if key.split(".lora_E", 1)[0] == module_name:
            return kept
    return None
