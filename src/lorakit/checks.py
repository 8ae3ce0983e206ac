"""Checks of config values, shared by the configs (`lorakit.config`, AdaLoRA's, the trainer's):
type tests that refuse bools, the limits on rank and alpha, the training strategies, a value quoted
safely in a message,
and the problems of one field (each a generator of messages, collected into one ConfigError).
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from pathlib import Path
from typing import Any

from lorakit.errors import AdapterFormatError

__all__ = ["MAX_RANK", "MAX_ALPHA", "STRATEGIES", "QUANTIZATIONS", "shown", "is_int", "is_number", "read_json_object", "compiles", "alpha_problems",
           "pattern_problems", "modules_to_save_problems", "mapping_problems"]

MAX_RANK = 2 ** 20
"""The largest rank a config may ask for. A rank above min(in_features, out_features) adds no
capacity, and no model has a layer 2**20 features wide; a larger value is a typo that would try
to allocate terabytes, so it is refused before anything is allocated (PEFT accepts it)."""
MAX_ALPHA = 2.0 ** 24
"""The largest |lora_alpha|: the update is multiplied by lora_alpha / r, and a scale beyond this
turns activations into inf in float32 / bfloat16 (typical values are 8 to 512)."""
STRATEGIES = ("ddp", "fsdp")
"""How several training processes share the model: the trainer's ``strategy`` (`lorakit.train`)
and the planner's ``--strategy`` (`lorakit.plan`) read the same choices from here."""
QUANTIZATIONS = ("nf4", "fp4", "int8")
"""How a frozen base may be stored (bitsandbytes, `lorakit.models.quantized`): 4-bit NF4 or FP4 with
double quantization, or 8-bit. The trainer's and the planner's ``--quantize`` read them from here."""

_shown_repr = reprlib.Repr()
_shown_repr.maxlevel, _shown_repr.maxstring, _shown_repr.maxother = 3, 60, 60
_shown_repr.maxlist = _shown_repr.maxtuple = _shown_repr.maxset = _shown_repr.maxdict = 8


def shown(value: Any) -> str:
    """``repr(value)`` cut short (nesting, long strings, long lists), safe on any input: error
    messages quote the bad value without echoing megabytes or recursing 100,000 levels deep."""
    try:
        return _shown_repr.repr(value)
    except Exception:  # a value whose own __repr__ fails
        return f"<{type(value).__name__}>"


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in file ``path``; AdapterFormatError naming the file when it is not
    readable text, not JSON, nested too deeply, or not an object (``[]``, ``null``, ``42``)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise AdapterFormatError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: nested too deeply to be an adapter config; "
                                 f"{path.name} is a flat object of field: value") from None
    except ValueError as err:  # JSONDecodeError, and numbers too long to convert
        raise AdapterFormatError(f"{path}: not valid JSON ({shown(str(err))})") from None
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: holds a JSON {type(data).__name__}, not an object; "
                                 f"{path.name} is an object of field: value (what save_pretrained writes)")
    return data


def compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return False
    return True


# PEFT-only options PEFT tests by truthiness, so that an empty list or dict leaves them off too;
# the others (trainable_token_indices, alora_invocation_tokens, arrow_config, ...) PEFT turns on
# for any value but None.
def alpha_problems(name: str, value: Any):
    if not is_number(value) or not math.isfinite(value):
        yield f"{name}={shown(value)}: must be a finite number, e.g. 16"
    elif abs(value) > MAX_ALPHA:
        yield (f"{name}={value!r}: |alpha| above {MAX_ALPHA:,.0f} scales the update by more than "
               "float32 / bfloat16 activations can hold; typical values are 8 to 512")


def pattern_problems(name: str, value: Any):
    """target_modules / exclude_modules: None, a regular expression (or 'all-linear'), or a
    non-empty list (tuple, set) of non-empty module names."""
    if value is None:
        return
    if isinstance(value, str):
        if value.lower() != "all-linear" and not compiles(value):
            yield f"{name}={shown(value)}: not a valid regular expression"
        return
    if not isinstance(value, (list, tuple, set, frozenset)) or not value \
            or not all(isinstance(v, str) and v for v in value):
        yield (f"{name}={shown(value)}: must be a non-empty list of module names (strings), "
               "a regular expression, 'all-linear', or null")


def modules_to_save_problems(value: Any):
    """modules_to_save: None or a list of non-empty names. PEFT matches each entry against module
    names as a suffix and, to keep those modules out of target_modules, as a regular expression
    in ``(^|.*\\.)<entry>($|\\..*)``: an entry must be a valid expression there."""
    if value is None:
        return
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(m, str) and m and compiles(rf"(^|.*\.){m}($|\..*)") for m in value):
        yield (f"modules_to_save={shown(value)}: must be a list of module names (non-empty strings, "
               "each a valid regular expression as PEFT matches them), or null")


def mapping_problems(name: str, mapping: Any, *, positive_int: bool):
    if not isinstance(mapping, dict):
        yield f"{name}={shown(mapping)}: must be a dict of {{module pattern: value}}"
        return
    for key, value in mapping.items():
        if not isinstance(key, str) or not key or not compiles(rf"(.*\.)?({key})$"):
            yield f"{name}[{shown(key)}]: not a valid module pattern (a non-empty regular expression)"
        if positive_int:
            if not is_int(value) or value <= 0:
                yield f"{name}[{shown(key)}]={shown(value)}: a rank must be a positive integer"
            elif value > MAX_RANK:
                yield (f"{name}[{shown(key)}]={value}: ranks above {MAX_RANK:,} exceed every layer's "
                       "min(in_features, out_features)")
        else:
            yield from alpha_problems(f"{name}[{shown(key)}]", value)
