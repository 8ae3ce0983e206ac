"""The one loader of "base model + adapters", for every command.

``load_adapted(adapters, model)`` loads the base model once and each adapter onto it by name,
frozen and in eval mode: ``lorakit eval`` and ``merge`` (one adapter directory, named "default" as
PEFT names a lone adapter), ``generate`` and ``compare`` (named adapters), ``serve`` (named
adapters on a given base). The base model is ``model`` when given, else the one base model the
adapters name (their ``base_model_name_or_path``, which must agree), else `DEFAULT_MODEL`.

Every problem with the names and directories is reported at once, before anything is loaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch

from ..config import LoraConfig
from ..errors import AdapterFormatError, CompatibilityError, ConfigError, LorakitError
from ..io import check_adapter_name
from ..model import PeftModel
from .load import DEFAULT_MODEL, load_model, resolve_model_dir

__all__ = ["Adapters", "adapter_pairs", "check_adapters", "common_base", "base_model_for", "load_adapted"]

Adapters = Union[str, os.PathLike, Sequence[tuple[str, Union[str, os.PathLike]]], Mapping[str, Union[str, os.PathLike]]]
"""One adapter directory (named "default"), ``[(name, directory), ...]`` or ``{name: directory}``."""


def adapter_pairs(adapters: Adapters) -> list[tuple[str, Path]]:
    """``[(name, directory), ...]`` in order; a lone directory is named "default"."""
    if isinstance(adapters, (str, os.PathLike)):
        return [("default", Path(adapters))]
    items = adapters.items() if isinstance(adapters, Mapping) else adapters
    return [(name, Path(directory)) for name, directory in items]


def check_adapters(pairs: Sequence[tuple[str, str | os.PathLike]],
                   reserved: Mapping[str, str] | None = None) -> dict[str, LoraConfig]:
    """Every problem with the names and directories, in one error; the adapters' configs.
    ``reserved``: names no adapter may take, each with what it means (e.g. the base model's name)."""
    problems, seen = [], set()
    for name, _ in pairs:
        try:
            check_adapter_name(name)
        except ConfigError as err:
            problems.append(str(err))
        if name in seen:
            problems.append(f"the name {name!r} is given twice; give each adapter its own name")
        if reserved and name in reserved:
            problems.append(f"the name {name!r} {reserved[name]}; rename the adapter")
        seen.add(name)
    if problems:
        raise ConfigError("--adapter: " + "; ".join(problems))
    missing = [f"{name}={directory}" for name, directory in pairs if not Path(directory).is_dir()]
    if missing:
        raise AdapterFormatError(f"no such adapter directory: {', '.join(missing)}; pass directories that "
                                 "hold adapter_config.json (e.g. runs/<run>/adapter)")
    return {name: LoraConfig.from_pretrained(directory) for name, directory in pairs}


def common_base(configs: Mapping[str, LoraConfig]) -> str | None:
    """The one base model the adapters name (paths compared after resolving), or raise."""

    def key(base: str) -> str:
        try:
            return str(resolve_model_dir(base).resolve())
        except LorakitError:
            return base

    named = {name: c.base_model_name_or_path for name, c in configs.items() if c.base_model_name_or_path}
    if len({key(base) for base in named.values()}) > 1:
        listed = ", ".join(f"{name}: {base}" for name, base in named.items())
        raise CompatibilityError(f"the adapters were trained on different base models ({listed}); use "
                                 "adapters of one base model")
    return next(iter(named.values()), None)


def base_model_for(adapters: Adapters, model: str | os.PathLike | None = None,
                   reserved: Mapping[str, str] | None = None) -> str:
    """The base model `load_adapted` loads: ``model``, else the adapters' common base, else the
    default (the adapters are checked as `load_adapted` checks them)."""
    configs = check_adapters(adapter_pairs(adapters), reserved)
    return str(model) if model else common_base(configs) or DEFAULT_MODEL


def load_adapted(adapters: Adapters = (), model: str | os.PathLike | None = None, *,
                 dtype: torch.dtype | str = torch.float32, reserved: Mapping[str, str] | None = None,
                 quantize: str | None = None):
    """``(model, tokenizer)``: the base model (see the module docstring) loaded once in ``dtype``
    (its linear layers quantized with ``quantize``: `load_model`), with each adapter loaded onto it
    under its name (the first one active), frozen and in eval mode; without adapters, the plain
    base model."""
    pairs = adapter_pairs(adapters)
    base, tokenizer = load_model(base_model_for(pairs, model, reserved), dtype=dtype, quantize=quantize)
    if not pairs:
        return base.eval(), tokenizer
    (first, first_dir), *others = pairs
    peft_model = PeftModel.from_pretrained(base, first_dir, adapter_name=first)
    for name, directory in others:
        peft_model.load_adapter(directory, name)
    return peft_model.eval(), tokenizer
