"""`LoraConfig`: the adapter's configuration, field for field the `adapter_config.json` file.

Names, arguments and defaults follow PEFT 0.21, so code written for `peft.LoraConfig` runs
unchanged and the JSON file loads in either library. Validation happens once, in
``__post_init__``, and reports every bad field in one `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from lorakit.checks import (  # noqa: F401  (MAX_RANK, read_json_object: part of this module's interface)
    MAX_ALPHA, MAX_RANK, alpha_problems, compiles, mapping_problems, modules_to_save_problems, pattern_problems,
    is_int, is_number, read_json_object, shown,
)
from lorakit.errors import AdapterFormatError, ConfigError
from lorakit.plugins import method_for, peft_types

__all__ = ["LoraConfig", "TaskType", "PRESETS", "preset", "CONFIG_NAME", "SEVEN_PROJECTIONS"]

CONFIG_NAME = "adapter_config.json"

SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class TaskType:
    """PEFT's task types; the value is what `adapter_config.json` stores."""

    SEQ_CLS = "SEQ_CLS"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    CAUSAL_LM = "CAUSAL_LM"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"

    ALL = (SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION)


# init_lora_weights values this version of lorakit implements (checked by _init_problems): True,
# False, "gaussian", "pissa", "pissa_niter_<N>" (N >= 0 subspace iterations) and "olora";
# "gaussian" and "olora" in any case, as PEFT compares them lower-cased. PiSSA and OLoRA replace
# the base weights by a residual: see lorakit.variants.inits.
PISSA_NITER = re.compile(r"pissa_niter_([0-9]+)")
# PEFT's other initialisations, which lorakit does not implement.
PEFT_ONLY_INITS = ("loftq", "eva", "corda", "orthogonal", "mica", "lora_ga")

# PEFT fields lorakit keeps for a faithful round trip of the file but does not implement:
# each must stay at its default value, or the config is refused with a clear message.
UNSUPPORTED_AT_DEFAULT = {
    "megatron_config": None,
    "trainable_token_indices": None,
    "loftq_config": {},
    "eva_config": None,
    "corda_config": None,
    "lora_ga_config": None,
    "velora_config": None,
    "alora_invocation_tokens": None,
    "use_qalora": False,
    "monteclora_config": None,
    "layer_replication": None,
    "lora_bias": False,
    "target_parameters": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
}

# Fields and the Python types a value of theirs may have, beyond the ones checked one by one in
# `LoraConfig._problems`. bool fields take only True / False (PEFT would read "false" as true).
_OPTIONAL_STR = ("peft_version", "base_model_name_or_path", "revision", "megatron_core")
_BOOLS = ("inference_mode", "fan_in_fan_out", "use_rslora", "use_dora", "ensure_weight_tying")

@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter: ``y = W x + scale * B A x`` with ``scale = alpha / r``.

    LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685) freezes W and learns A (r x in) and
    B (out x r). Field names, meanings and defaults are PEFT's (`peft.LoraConfig`, 0.21).
    """

    # --- bookkeeping PEFT writes into every adapter_config.json
    task_type: Optional[str] = None
    """CAUSAL_LM, SEQ_CLS, ... ; SEQ_CLS and TOKEN_CLS also save the classifier head."""
    peft_type: Optional[str] = "LORA"
    auto_mapping: Optional[dict] = None
    peft_version: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    """The base model this adapter was trained on; filled from the model on save."""
    revision: Optional[str] = None
    inference_mode: bool = False
    """True: adapter weights are frozen (what `from_pretrained` gives without is_trainable)."""

    # --- the LoRA hyper-parameters
    r: int = 8
    """Rank of the update: A is (r x in), B is (out x r)."""
    target_modules: Optional[Union[list[str], str]] = None
    """List: a module matches if its name equals an entry or ends with "." + entry.
    String: a full-match regular expression. "all-linear": every linear layer but the output head.
    None: the default for the model's architecture (e.g. q_proj, v_proj for Llama)."""
    exclude_modules: Optional[Union[list[str], str]] = None
    """Modules never adapted, with the same matching rules as target_modules."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    lora_dropout: float = 0.0
    """Dropout probability applied to the adapter's input during training."""
    fan_in_fan_out: bool = False
    """True for layers that store their weight as (in, out), such as GPT-2's Conv1D."""
    bias: str = "none"
    """Which biases train: "none", "all" (every bias in the model) or "lora_only"."""
    use_rslora: bool = False
    """rsLoRA (Kalajdzievski 2023): scale = lora_alpha / sqrt(r), stable at high ranks."""
    modules_to_save: Optional[list[str]] = None
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    init_lora_weights: Union[bool, str] = True
    """True: A kaiming-uniform, B zero (the update starts at 0). "gaussian": A ~ N(0, 1/r).
    False: A and B random (for tests; the update is not zero). "pissa", "pissa_niter_<N>" (PiSSA,
    randomized SVD with N iterations) and "olora" (OLoRA) start A and B on the base weight's
    principal directions and REPLACE THE BASE WEIGHTS by the residual W - scale * B A; the adapter
    then loads only onto the original base (see `lorakit.variants.inits`)."""
    layers_to_transform: Optional[Union[list[int], int]] = None
    """Only adapt these layer indices (with layers_pattern naming the layer list)."""
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict = field(default_factory=dict)
    """Per-module rank: {pattern: r}; the most specific matching pattern wins."""
    alpha_pattern: dict = field(default_factory=dict)
    """Per-module alpha: {pattern: alpha}; the most specific matching pattern wins."""
    use_dora: bool = False
    """DoRA (Liu et al. 2024): a trained magnitude per output feature times the LoRA-updated
    direction (`lorakit.variants.dora`). Linear and Conv1D layers; not embeddings."""

    # --- PEFT fields lorakit stores but does not implement (must stay at their defaults)
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Any] = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    velora_config: Optional[dict] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[dict] = None
    layer_replication: Optional[list] = None
    lora_bias: bool = False
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[dict] = None
    arrow_config: Optional[dict] = None
    kasa_config: Optional[dict] = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        problems = list(self._problems())  # before any conversion: set() of a nested list fails
        if problems:
            raise ConfigError("invalid LoraConfig:\n  - " + "\n  - ".join(problems))
        if self.peft_type is None:  # PEFT sets its own
            self.peft_type = self.PEFT_TYPE
        # PEFT keeps list-valued targets as sets; so do we (saved sorted).
        if isinstance(self.target_modules, (list, tuple, set, frozenset)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple, set, frozenset)):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.layers_to_transform, tuple):
            self.layers_to_transform = list(self.layers_to_transform)
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = list(self.modules_to_save)

    def _problems(self):
        """Yield one message per invalid field; every message names the field and the fix."""
        if self.peft_type not in (self.PEFT_TYPE, None):
            yield (f"peft_type={shown(self.peft_type)}: a {type(self).__name__} has peft_type "
                   f"{self.PEFT_TYPE!r}; lorakit reads {', '.join(peft_types())} adapters")
        if not is_int(self.r) or self.r <= 0:
            yield f"r={shown(self.r)}: the rank must be a positive integer, e.g. r=16"
        elif self.r > MAX_RANK:
            yield (f"r={self.r}: ranks above {MAX_RANK:,} exceed min(in_features, out_features) of any "
                   "layer and would allocate absurd amounts of memory; typical ranks are 4 to 256")
        yield from alpha_problems("lora_alpha", self.lora_alpha)
        if not is_number(self.lora_dropout) or not 0.0 <= self.lora_dropout < 1.0:
            yield f"lora_dropout={shown(self.lora_dropout)}: must be a probability in [0, 1), e.g. 0.05"
        if self.bias not in ("none", "all", "lora_only"):
            yield f"bias={shown(self.bias)}: must be one of 'none', 'all', 'lora_only'"
        if self.task_type is not None and self.task_type not in TaskType.ALL:
            yield f"task_type={shown(self.task_type)}: must be one of {', '.join(TaskType.ALL)} or None"
        for name in _OPTIONAL_STR:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                yield f"{name}={shown(value)}: must be a string or null"
        for name in _BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                what = "True (DoRA) or False (plain LoRA)" if name == "use_dora" else "true or false"
                yield f"{name}={shown(value)}: must be {what}"
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, dict):
            yield f"auto_mapping={shown(self.auto_mapping)}: must be a mapping or null"
        if not is_int(self.qalora_group_size):
            yield f"qalora_group_size={shown(self.qalora_group_size)}: must be an integer (it is unused unless use_qalora)"
        yield from pattern_problems("target_modules", self.target_modules)
        yield from pattern_problems("exclude_modules", self.exclude_modules)
        yield from modules_to_save_problems(self.modules_to_save)
        yield from self._layer_problems()
        yield from self._rank_pattern_problems()
        yield from mapping_problems("alpha_pattern", self.alpha_pattern, positive_int=False)
        yield from _init_problems(self.init_lora_weights)
        for name, default in UNSUPPORTED_AT_DEFAULT.items():
            value = getattr(self, name)
            if not _unset(name, value, default):
                yield (f"{name}={shown(value)}: lorakit does not implement this PEFT option; "
                       f"leave it at {default!r}")

    def _layer_problems(self):
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if layers is not None:
            items = [layers] if is_int(layers) else layers
            if not isinstance(items, (list, tuple)) or not all(is_int(i) and i >= 0 for i in items):
                yield (f"layers_to_transform={shown(layers)}: must be a layer index or a list of "
                       "non-negative layer indices")
            if isinstance(self.target_modules, str):
                yield ("layers_to_transform: cannot be combined with a regular-expression "
                       "target_modules; put the layer indices into the expression instead")
        if pattern is not None:
            items = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(items, (list, tuple)) or not all(
                    isinstance(p, str) and compiles(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in items):
                yield (f"layers_pattern={shown(pattern)}: must be the name of the layer list (e.g. "
                       "'layers'), a list of such names, or null; each is a regular expression")
            elif isinstance(self.target_modules, str):
                yield ("layers_pattern: cannot be combined with a regular-expression target_modules; "
                       "put the layer indices into the expression instead")
        if pattern and layers is None:
            yield ("layers_pattern: only has a meaning together with layers_to_transform; "
                   "set layers_to_transform or remove layers_pattern")

    PEFT_TYPE = "LORA"
    """The peft_type this class reads and writes (a class attribute, not a field)."""

    def _rank_pattern_problems(self):
        yield from mapping_problems("rank_pattern", self.rank_pattern, positive_int=True)

    # --- the file
    def to_dict(self) -> dict[str, Any]:
        """Every field, as PEFT writes it; sets become sorted lists."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, set):
                value = sorted(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraConfig":
        """Build from a dict; keys this version does not know (a newer PEFT) are dropped
        with a warning, as PEFT does."""
        if not isinstance(data, dict):
            raise ConfigError(f"an adapter config must be a mapping of field: value, not {shown(data)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted((shown(k) if not isinstance(k, str) else k for k in data if k not in known))
        if unknown:
            warnings.warn(
                f"adapter config keys not known to this lorakit version were ignored: {unknown}",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})

    def save_pretrained(self, save_directory: str | os.PathLike, **overrides: Any) -> Path:
        """Write ``adapter_config.json`` (sorted keys, indent 2) into ``save_directory``."""
        data = {**self.to_dict(), **overrides}
        path = Path(save_directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
        return path

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "LoraConfig":
        """Read ``adapter_config.json`` from an adapter directory."""
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise AdapterFormatError(
                f"{path}: no {CONFIG_NAME} here; an adapter directory holds {CONFIG_NAME} and "
                "adapter_model.safetensors (what save_pretrained writes)"
            )
        data = read_json_object(path)
        peft_type = data.get("peft_type")
        if peft_type is not None and (not isinstance(peft_type, str) or peft_type not in peft_types()):
            raise ConfigError(f"{path}: peft_type is {shown(peft_type)}; lorakit loads "
                              f"{', '.join(peft_types())} adapters only")
        config_class = method_for(peft_type).config_class  # its method's (lorakit.methods)
        if not issubclass(config_class, cls):
            raise ConfigError(f"{path}: peft_type is {peft_type!r}, not a {cls.__name__}; read it with "
                              f"{config_class.__name__}.from_pretrained (or LoraConfig.from_pretrained)")
        try:
            return config_class.from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None


def _init_problems(init: Any):
    if isinstance(init, bool) or (isinstance(init, str) and (
            init == "pissa" or PISSA_NITER.fullmatch(init)
            or init.lower() in ("gaussian", "olora"))):
        return
    supported = "True (PEFT's default), 'gaussian', 'pissa', 'pissa_niter_<N>', 'olora' or False"
    if isinstance(init, str) and init.lower() in PEFT_ONLY_INITS:
        yield (f"init_lora_weights={init!r}: PEFT's {init.lower()} initialisation is not implemented "
               f"in lorakit; use {supported}")
    elif isinstance(init, str) and init.lower().startswith("pissa"):
        yield (f"init_lora_weights={init!r}: write 'pissa' (exact SVD) or 'pissa_niter_<N>' with N a "
               "non-negative integer (randomized SVD, e.g. 'pissa_niter_4'), in lower case as PEFT reads it")
    else:
        yield f"init_lora_weights={shown(init)}: lorakit supports {supported}"


_EMPTY_IS_UNSET = ("megatron_config", "loftq_config", "layer_replication", "target_parameters")


def _unset(name: str, value: Any, default: Any) -> bool:
    """Whether PEFT-only option ``name`` is off, as PEFT reads ``value``."""
    if value is default or (type(value) is type(default) and value == default):
        return True
    return name in _EMPTY_IS_UNSET and (value is None or (type(value) in (dict, list) and not value))


# The three configuration patterns of the LoRA lesson our users start from.
PRESETS: dict[str, dict[str, Any]] = {
    # Initial experiments or small data sets: attention only, light regularisation.
    "conservative": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.05),
    # Most production use: all seven projections at rank 16, no dropout.
    "balanced": dict(r=16, lora_alpha=16, target_modules=SEVEN_PROJECTIONS, lora_dropout=0.0),
    # Complex adaptations with abundant data.
    "max_capacity": dict(r=64, lora_alpha=64, target_modules=SEVEN_PROJECTIONS, lora_dropout=0.0),
}


def preset(name: str, **overrides: Any) -> LoraConfig:
    """A `LoraConfig` from one of `PRESETS` ("conservative", "balanced", "max_capacity")."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return LoraConfig(**{**PRESETS[name], **overrides})
