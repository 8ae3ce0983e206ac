"""Which modules an adapter targets, wrapping them, and which parameters train.

Matching follows PEFT: a list entry matches a module whose name equals it or ends with
``"." + entry``; a string is a full-match regular expression; ``"all-linear"`` is every linear
layer except the output head. Unlike PEFT, a list entry that matches nothing is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings
from typing import Iterator

import torch.nn as nn

from lorakit import plugins
from lorakit.config import LoraConfig, TaskType
from lorakit.errors import ConfigError
from lorakit.layer import LoraLayer, is_conv1d, make_lora_layer, supported_layer
from lorakit.plugins import method_for

__all__ = [
    "ModulesToSave", "logical_modules", "resolve_targets", "inject_adapter", "inject_lora", "mark_trainable",
    "count_parameters", "lora_layers", "pattern_value", "replace_module", "name_matches", "layer_index_ok",
    "match_targets", "wrap_modules_to_save", "saved_module_matches", "saved_modules",
]

# PEFT's defaults when target_modules is None, by `model.config.model_type`.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"], "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"], "gpt2": ["c_attn"], "gpt_bigcode": ["c_attn"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "t5": ["q", "v"],
    "bart": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"], "falcon": ["query_key_value"],
    "bloom": ["query_key_value"], "gptj": ["q_proj", "v_proj"], "stablelm": ["q_proj", "v_proj"],
}
# Classifier heads that PEFT trains and saves in full for classification tasks.
CLASSIFIER_HEADS = ("classifier", "score")


class ModulesToSave(nn.Module):
    """A module trained in full for an adapter: the original stays frozen, each adapter gets a copy.

    Parameter names are PEFT's (``original_module``, ``modules_to_save.<adapter>``)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def forward(self, *args, **kwargs):
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module(*args, **kwargs)
        return self.modules_to_save[self.active_adapter](*args, **kwargs)


def logical_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` as the user's model has them: a LoRA layer or a ModulesToSave wrapper
    is reported under the wrapped module's name and not entered."""
    yield prefix, model
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, (LoraLayer, ModulesToSave)):
            yield path, child
        else:
            yield from logical_modules(child, path)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in logical_modules(model):
        if isinstance(module, LoraLayer):
            yield name, module


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, LoraLayer):
        return not module.is_embedding
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _output_head_names(model: nn.Module, config: LoraConfig) -> set[str]:
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None and config.task_type == TaskType.SEQ_CLS:
        out = next((getattr(model, n) for n in CLASSIFIER_HEADS if hasattr(model, n)), None)
    for name, module in logical_modules(model):
        if out is not None and (module is out or getattr(module, "base_layer", None) is out):
            heads.add(name)
    return heads


def _minimal_suffixes(chosen: set[str], all_names: list[str]) -> set[str]:
    """The shortest name suffixes that select exactly ``chosen`` among ``all_names``."""
    others = [n for n in all_names if n and n not in chosen]
    suffixes = set()
    for name in sorted(chosen):
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(o == suffix or o.endswith("." + suffix) for o in others):
                suffixes.add(suffix)
                break
    return suffixes


def resolve_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """The config with ``target_modules`` made concrete: the architecture's default for None,
    the linear layers for "all-linear"."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(
                f"target_modules is not set and lorakit has no default for model type "
                f"{model_type!r}; pass target_modules, e.g. ['q_proj', 'v_proj'] or 'all-linear'"
            )
        return dataclasses.replace(config, target_modules=list(DEFAULT_TARGETS[model_type]))
    if isinstance(targets, str) and targets.lower() == "all-linear":
        names = [n for n, _ in logical_modules(model)]
        heads = _output_head_names(model, config)
        linear = {n for n, m in logical_modules(model) if n and _is_linear(m) and n not in heads}
        if not linear:
            raise ConfigError("target_modules='all-linear': the model has no linear layers to adapt")
        return dataclasses.replace(config, target_modules=_minimal_suffixes(linear, names))
    return config


def name_matches(entry_or_regex, name: str) -> bool:
    """PEFT's target rule: a string is a full-match regular expression; a collection matches a
    name equal to an entry or ending with "." + entry."""
    if isinstance(entry_or_regex, str):
        return re.fullmatch(entry_or_regex, name) is not None
    return name in entry_or_regex or any(name.endswith("." + e) for e in entry_or_regex)


def layer_index_ok(layers, patterns, name: str) -> bool:
    """``layers_to_transform`` / ``layers_pattern``: whether module ``name`` sits in one of the
    chosen layers (the first number after the layer list's name, PEFT's rule)."""
    if layers is None:
        return True
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = None
        for pattern in patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == layers if isinstance(layers, int) else index in layers


def _excluded(config: LoraConfig, name: str) -> bool:
    if config.exclude_modules and name_matches(config.exclude_modules, name):
        return True
    # PEFT's rule (peft.tuners.tuners_utils.check_target_module_exists): each modules_to_save entry,
    # as a regular expression, matching the whole name or a dot-separated part of it
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in config.modules_to_save or ())


def pattern_value(patterns: dict, name: str, default):
    """The value of the most specific pattern in ``patterns`` that matches module ``name``.

    A pattern matches when it matches the whole name or a dot-separated tail of it (PEFT's rule).
    Where several match, the one matching the longest tail wins, then the longer pattern, so the
    answer never depends on the order of the dict (PEFT takes the first in dict order, which
    changes meaning once the config is saved with sorted keys).
    """
    best, best_key = default, None
    for key in patterns:
        match = re.match(rf"(.*\.)?({key})$", name)
        if match:
            rank = (len(match.group(2)), len(key), key)
            if best_key is None or rank > best_key:
                best, best_key = patterns[key], rank
    return best


def match_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    targets = config.target_modules
    found, hit_entries = [], set()
    for name, module in logical_modules(model):
        if not name or not name_matches(targets, name):
            continue
        if isinstance(targets, (set, list)):  # an entry whose matches are all excluded still matched
            hit_entries.update(e for e in targets if name == e or name.endswith("." + e))
        if _excluded(config, name) or not layer_index_ok(config.layers_to_transform, config.layers_pattern, name):
            continue
        base = module.base_layer if isinstance(module, LoraLayer) else module
        if not supported_layer(base):
            raise ConfigError(
                f"target_modules matched {name!r}, a {type(base).__name__}; LoRA applies to "
                "Linear, Conv1D and Embedding layers only: name those layers instead"
            )
        found.append((name, module))
    existing = sorted({n.rsplit(".", 1)[-1] for n, m in logical_modules(model)
                       if n and supported_layer(getattr(m, "base_layer", m))})
    if isinstance(targets, (set, list)):
        missing = sorted(set(targets) - hit_entries)
        if missing:
            raise ConfigError(
                f"target_modules entries matched no module: {missing}; "
                f"the model's adaptable layers are named: {existing}"
            )
    if not found:
        raise ConfigError(
            f"target_modules={_shown(targets)} matched no module (after layers_to_transform and "
            f"exclude_modules); the model's adaptable layers are named: {existing}"
        )
    return found


def _shown(targets) -> str:
    return repr(sorted(targets)) if isinstance(targets, (set, list)) else repr(targets)


def inject_adapter(model: nn.Module, config: LoraConfig, adapter_name: str,
                   autocast_adapter_dtype: bool = True) -> LoraConfig:
    """Add adapter ``adapter_name`` to every targeted module of ``model`` (in place), the way
    its method (``config.peft_type``, `lorakit.methods`) does.

    Returns the config with concrete target_modules (what is saved)."""
    return method_for(config.peft_type).inject(model, config, adapter_name, autocast_adapter_dtype)


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str,
                autocast_adapter_dtype: bool = True) -> LoraConfig:
    """LORA's injection: a `LoraLayer` around each targeted module, one `Adapter` added to it,
    turned into the variants the config asks for (DoRA, `lorakit.plugins`).

    Returns the config with concrete target_modules (what is saved)."""
    config = resolve_targets(model, config)
    found = match_targets(model, config)
    saved_modules(model, config, adapted={name for name, _ in found})  # its errors, before any change
    wanted = [v for v in plugins.variants() if v.wanted(config)]
    for variant in wanted:
        variant.check_targets(found)  # before anything is wrapped
    for name, module in found:
        layer = module
        if not isinstance(layer, LoraLayer):
            fan_in_fan_out = config.fan_in_fan_out
            if is_conv1d(module) and not fan_in_fan_out:
                warnings.warn(f"{name} is a Conv1D (weight stored (in, out)): using fan_in_fan_out=True",
                              stacklevel=3)
            elif isinstance(module, nn.Linear) and fan_in_fan_out:
                warnings.warn(f"{name} is an nn.Linear: fan_in_fan_out=True does not apply to it; "
                              "using False", stacklevel=3)
                fan_in_fan_out = False
            layer = make_lora_layer(module, fan_in_fan_out)
            replace_module(model, name, layer)
        layer.add_adapter(
            adapter_name,
            r=pattern_value(config.rank_pattern, name, config.r),
            lora_alpha=pattern_value(config.alpha_pattern, name, config.lora_alpha),
            lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
            init=config.init_lora_weights, autocast_fp32=autocast_adapter_dtype,
        )
        for variant in wanted:  # after the init, which may change W (PiSSA, OLoRA)
            variant.attach(layer, adapter_name)
    wrap_modules_to_save(model, config, adapter_name)
    return config


def saved_module_matches(entry: str, name: str) -> bool:
    """PEFT's modules_to_save rule (``peft.utils.other._set_trainable``): a module is trained in
    full when its name ENDS WITH an entry, as plain text, with no dot needed before it: "norm"
    wraps input_layernorm, post_attention_layernorm and model.norm alike."""
    return bool(name) and name.endswith(entry)


def saved_modules(model: nn.Module, config: LoraConfig, adapted=()) -> list[str]:
    """The modules ``config.modules_to_save`` (plus the classifier heads of SEQ_CLS and TOKEN_CLS)
    trains in full, by PEFT's rule (`saved_module_matches`) over the user's modules; ConfigError
    for an entry that matches nothing. ``adapted``: names about to get LoRA layers.

    Unlike PEFT, which also looks inside its LoRA layers (an entry "layer" wraps every
    ``base_layer``) and wraps LoRA layers themselves (an entry "proj" with LoRA on q_proj),
    lorakit refuses an entry that matches a LoRA-adapted module or a module inside another one it
    wraps: PEFT's result in those cases does not save and load back consistently."""
    wanted = list(dict.fromkeys(config.modules_to_save or ()))
    if config.task_type in (TaskType.SEQ_CLS, TaskType.TOKEN_CLS):
        wanted += [h for h in CLASSIFIER_HEADS if h not in wanted]
    hit, chosen = set(), []
    for name, module in logical_modules(model):
        entries = [e for e in wanted if saved_module_matches(e, name)]
        if not entries:
            continue
        hit.update(entries)
        if isinstance(module, LoraLayer) or name in adapted:
            raise ConfigError(f"modules_to_save entry {entries[0]!r} matches {name!r} (PEFT's rule: the "
                              "module name ends with the entry), which target_modules adapts with LoRA; a "
                              "module is either adapted or trained in full: use a longer entry, or leave "
                              "the module out of target_modules")
        outer = next((c for c in chosen if name.startswith(c + ".")), None)
        if outer is not None:
            raise ConfigError(f"modules_to_save entry {entries[0]!r} matches {name!r}, which sits inside "
                              f"{outer!r}, also matched; name only the outer module")
        chosen.append(name)
    missing = [e for e in config.modules_to_save or () if e not in hit and e not in CLASSIFIER_HEADS]
    if missing:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in logical_modules(model) if n})
        raise ConfigError(f"modules_to_save entries matched no module: {missing} (a module matches "
                          f"when its name ends with the entry); the model's modules are named: {names}")
    return chosen


def wrap_modules_to_save(model: nn.Module, config: LoraConfig, adapter_name: str) -> None:
    """Wrap each of `saved_modules` in a `ModulesToSave` with a trainable copy for ``adapter_name``."""
    for name in saved_modules(model, config):
        module = model.get_submodule(name)
        if not isinstance(module, ModulesToSave):
            module = ModulesToSave(module)
            replace_module(model, name, module)
        module.add_adapter(adapter_name)


def mark_trainable(model: nn.Module, adapter_names: list[str], config: LoraConfig | None) -> None:
    """Freeze everything, then unfreeze the adapters in ``adapter_names`` (unless the config is
    in inference mode), the biases that ``config.bias`` asks for, and their modules_to_save."""
    for p in model.parameters():
        p.requires_grad_(False)
    if config is None or config.inference_mode:
        return
    for name, module in logical_modules(model):
        if isinstance(module, LoraLayer):
            for adapter in adapter_names:
                if adapter in module.adapters:  # A, B and DoRA's magnitude
                    module.adapters[adapter].requires_grad_(True)
            if config.bias == "lora_only" and getattr(module.base_layer, "bias", None) is not None:
                module.base_layer.bias.requires_grad_(True)
        elif isinstance(module, ModulesToSave):
            for adapter in adapter_names:
                if adapter in module.modules_to_save:
                    module.modules_to_save[adapter].requires_grad_(True)
    if config.bias == "all":
        for name, p in bias_parameters(model):
            p.requires_grad_(True)


def bias_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Every bias of the model, outside ModulesToSave wrappers (those save their own)."""
    skip = [n + "." for n, m in logical_modules(model) if isinstance(m, ModulesToSave)]
    for name, p in model.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias" and not any(name.startswith(s) for s in skip):
            yield name, p


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; shared parameters count once (PEFT's rule)."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # bitsandbytes 4-bit: two weights in each byte stored (PEFT counts so)
            n *= 2 * p.element_size()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
