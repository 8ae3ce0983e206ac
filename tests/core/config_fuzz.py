"""A seeded fuzzer of adapter configurations, run against lorakit and PEFT side by side.

Each case mutates a valid set of `LoraConfig` arguments (1 to 3 fields set to a hostile or a
plausible value: wrong types, huge / negative / NaN numbers, nested lists, None, strings, lists
for scalars, unknown keys) and goes through one of three doors:

    "kwargs"  LoraConfig(**kwargs)                      vs peft.LoraConfig(**kwargs)
    "dict"    LoraConfig.from_dict(d) (unknown keys)    vs peft.LoraConfig.from_peft_type(**d)
    "file"    adapter_config.json on disk, loaded by LoraConfig.from_pretrained / PeftModel.from_pretrained
              vs peft.PeftConfig.from_pretrained; some files are also broken as a whole ([], null, 42,
              bad JSON, deep nesting, an r that disagrees with the tensors)
    "yaml"    a config.yaml read by lorakit.train.config.load_train_config (lorakit only)

and gets one verdict (`Verdict.kind`):

    identical       lorakit accepts, PEFT accepts, the resolved fields are equal and, on a tiny
                    Llama, the same modules are adapted / saved and (for a sample) an adapter
                    saved by lorakit gives the same logits loaded in PEFT
    typed           lorakit refuses with a LorakitError (ConfigError, AdapterFormatError, ...) and
                    PEFT refuses too, or fails later (at injection, or with non-finite outputs)
    deliberate      lorakit refuses with a LorakitError where PEFT works; the message matches one
                    of DELIBERATE, each a documented choice (a value PEFT silently misreads, an
                    option lorakit does not implement, a typo PEFT only warns about)
    untyped         lorakit raised something that is not a LorakitError (a bug; target 0)
    mismatch        lorakit accepts and PEFT refuses or differs, or lorakit refuses with a message
                    no DELIBERATE entry explains (a bug or an undocumented difference)

`tests/core/test_config_fuzz.py` runs a few hundred cases; `bench/hostile/configs.py` runs more.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import yaml

import lorakit
from lorakit.errors import LorakitError
from lorakit.inject import ModulesToSave
from lorakit.layer import LoraLayer
from lorakit.train.config import load_train_config

BASE = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            task_type="CAUSAL_LM")

_FIELDS = [f.name for f in dataclasses.fields(lorakit.LoraConfig)]


def deep(depth: int) -> list:
    outer = inner = []
    for _ in range(depth):
        inner.append([])
        inner = inner[0]
    return outer


INF = float("inf")
HOSTILE: list[Any] = [
    0, -1, 1, 2, 3, 2**31, 10**18, -(10**18), 1.5, 0.5, -0.5, float("nan"), INF, -INF, 1e308, -1e308,
    True, False, None, "", "q_proj", "all-linear", "ALL-LINEAR", r".*\.q_proj", "[", "norm", "lm_head",
    "layers", "LORA", "ADALORA", "IA3", "CAUSAL_LM", "SEQ_CLS", "none", "all", "lora_only", "gaussian",
    "pissa", "olora", "loftq", "true", "false", "8", "x" * 300, [], [0], [1], [0, 1], [-1], [True],
    ["q_proj"], ["k_proj", "o_proj"], ["norm"], ["lm_head"], [["q_proj"]], [None], [1, 2],
    ["q_proj", 3], [""], ["["], {}, {"q_proj": 2}, {"v_proj": 16}, {"q_proj": "x"}, {"q_proj": 0},
    {"q_proj": 1e308}, {"[": 2}, {"q_proj": [1]}, ("q_proj",), [8], [[[[["deep"]]]]],
]
PLAUSIBLE: dict[str, list[Any]] = {
    "r": [1, 2, 8, 16], "lora_alpha": [1, 16, -8, 0.5, 32.0], "lora_dropout": [0.0, 0.1, 0.5],
    "target_modules": [["q_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], "all-linear",
                       r".*\.q_proj", ["down_proj"], ["embed_tokens", "q_proj"], ("v_proj",)],
    "exclude_modules": [["k_proj"], [r"v_proj"], r".*\.0\..*"],
    "modules_to_save": [["norm"], ["lm_head"], ["input_layernorm"], ["model.norm"]],
    "layers_to_transform": [0, [1], [0, 1]], "layers_pattern": ["layers"],
    "rank_pattern": [{"q_proj": 2}, {"model.layers.1.self_attn.v_proj": 3}],
    "alpha_pattern": [{"v_proj": 16}, {"q_proj": 2.5}], "bias": ["all", "lora_only", "none"],
    "use_rslora": [True, False], "init_lora_weights": [True, False, "gaussian", "GAUSSIAN"],
    "use_dora": [True, False], "fan_in_fan_out": [False], "inference_mode": [True, False],
    "base_model_name_or_path": ["tiny-llama"], "revision": ["main"], "task_type": ["CAUSAL_LM", None],
}

# lorakit refuses, PEFT works: each a deliberate difference (message pattern -> why).
DELIBERATE: dict[str, str] = {
    r"ranks above 1,048,576": "r or a rank_pattern value beyond 2**20 exceeds every layer's min(in, out); "
                              "PEFT tries to allocate it",
    r"\|alpha\| above": "a scale beyond 2**24 overflows activations; PEFT accepts it and outputs inf",
    r"must be true or false|must be True \(DoRA\) or False": "PEFT reads any truthy value, the string 'false' included, as True",
    r"must be a string or null|must be a mapping or null|must be an integer \(it is unused": "PEFT stores "
        "any value in its bookkeeping fields and writes it into the file",
    r"lorakit does not implement this PEFT option|initialisation is not implemented": "PEFT options lorakit "
        "does not implement are refused, not ignored",
    r"entries matched no module|matched no module": "a target_modules / modules_to_save entry that matches "
        "nothing is a typo; PEFT only warns (inject.py's docstring)",
    r"peft_type is 'IA3'": "lorakit implements the LORA and ADALORA methods only",
    r"peft_type=": "PEFT's LoraConfig overwrites any peft_type with LORA; lorakit refuses a wrong one",
    r"lora_dropout=.*must be a probability in \[0, 1\)": "dropout 1.0 zeroes the adapter's input (PEFT "
        "allows it); a bool is not a probability",
    r"(r|lora_alpha|alpha_pattern\[.*\]|rank_pattern\[.*\])=(True|False)": "a bool is not a number "
                                                                              "(PEFT computes with True as 1)",
    r"must be a non-empty list of module names": "PEFT also takes a dict or a tuple of anything for "
        "target_modules / exclude_modules and matches its keys; lorakit takes lists of names",
    r"layers_to_transform=": "negative or bool layer indices select nothing in PEFT",
    r"rank_pattern\[|alpha_pattern\[": "a pattern PEFT cannot apply (no module matches the key) is "
        "ignored by PEFT with a warning",
    r"modules_to_save entry .* (which target_modules adapts|sits inside)": "PEFT wraps a LoRA layer (or a "
        "module inside another saved one) in its ModulesToSaveWrapper; the result does not load back",
    r"modules_to_save=": "PEFT matches a string's characters one by one; lorakit takes a list of names",
    r"layers_pattern": "a layers_pattern without layers_to_transform does nothing in PEFT",
    r"init_lora_weights=": "values PEFT treats as 'random init' (any other string) are refused",
    r"task_type=": "PEFT checks task_type as lorakit does; reached only with an unhashable value",
    r"ensure_weight_tying": "lorakit does not implement weight tying",
    r"unexpected tensors|missing tensors|has no tensors for": "PEFT loads a file whose tensors are not the config's with a "
        "warning (unexpected ones dropped, missing ones left at their init); lorakit's loading is strict",
}


@dataclass
class Verdict:
    kind: str
    door: str
    case: Any
    detail: str = ""


def _normal(value: Any) -> Any:
    """Field values compared between the libraries: collections as sorted lists, enums as str."""
    if isinstance(value, (set, frozenset, tuple, list)):
        items = [_normal(v) for v in value]
        return sorted(items, key=repr) if isinstance(value, (set, frozenset)) or all(isinstance(v, str) for v in items) \
            else items
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if hasattr(value, "value") and isinstance(getattr(value, "value"), str):
        return value.value
    return value


def _field_differences(ours: lorakit.LoraConfig, theirs: peft.LoraConfig) -> list[str]:
    out = []
    for name in _FIELDS:
        if name in ("peft_version",) or not hasattr(theirs, name):
            continue
        a, b = _normal(getattr(ours, name)), _normal(getattr(theirs, name))
        if a != b and not (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)):
            out.append(f"{name}: lorakit {a!r:.80} vs PEFT {b!r:.80}")
    return out


def _tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


_BASE_MODEL: torch.nn.Module | None = None
_IDS = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(123))


def _base() -> torch.nn.Module:
    global _BASE_MODEL
    if _BASE_MODEL is None:
        _BASE_MODEL = _tiny_llama()
    return copy.deepcopy(_BASE_MODEL)


def _structure(model, lora_cls, save_cls) -> tuple[list[str], list[str]]:
    lora, saved = [], []
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, save_cls):
            saved.append(name)
        elif isinstance(module, lora_cls) and not any(name.startswith(s + ".") for s in saved):
            lora.append(name)
    return sorted(lora), sorted(saved)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_IDS).logits


def _peft_works(kwargs_or_dict: dict, door: str) -> tuple[bool, str]:
    """Whether PEFT takes this config all the way: config, injection on the tiny Llama and a
    forward pass with finite outputs."""
    try:
        config = _peft_config(kwargs_or_dict, door)
        model = peft.get_peft_model(_base(), config).eval()
        out = _logits(model)
    except Exception as err:  # PEFT's own failures are of any type
        return False, f"{type(err).__name__}: {str(err)[:120]}"
    if not torch.isfinite(out).all():
        return False, "non-finite outputs"
    return True, ""


def _peft_config(data: dict, door: str):
    if door == "kwargs":
        return peft.LoraConfig(**data)
    return peft.LoraConfig.from_peft_type(**{**data, "peft_type": "LORA"}) if data.get("peft_type") in (None, "LORA") \
        else peft.PeftConfig.from_peft_type(**data)


def _lorakit_config(data: dict, door: str) -> lorakit.LoraConfig:
    return lorakit.LoraConfig(**data) if door == "kwargs" else lorakit.LoraConfig.from_dict(data)


def _deliberate(message: str) -> str | None:
    """The reasons of DELIBERATE that explain every problem the message lists; None if one is not."""
    problems = message.split("\n  - ")[1:] or [message]
    reasons = []
    for problem in problems:
        why = next((why for pattern, why in DELIBERATE.items() if re.search(pattern, problem)), None)
        if why is None:
            return None
        reasons.append(why)
    return " || ".join(dict.fromkeys(reasons))


def _refused(data, door, err, peft_check: bool) -> Verdict:
    message = str(err)
    if not peft_check:
        return Verdict("typed", door, data, message[:200])
    works, why = _peft_works(data, door)
    if not works:
        return Verdict("typed", door, data, f"{message[:160]} | PEFT: {why}")
    reason = _deliberate(message)
    if reason is None:
        return Verdict("mismatch", door, data, f"lorakit refuses, PEFT works: {message[:300]}")
    return Verdict("deliberate", door, data, f"{message[:160]} | {reason}")


def run_config_case(data: dict, door: str, compare_outputs: bool = False) -> Verdict:
    """One LoraConfig case through door "kwargs" or "dict" (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ours = _lorakit_config(data, door)
        except LorakitError as err:
            return _refused(data, door, err, peft_check=True)
        except Exception as err:  # noqa: BLE001 - what the fuzzer is here to find
            return Verdict("untyped", door, data, f"{type(err).__name__}: {str(err)[:300]}")
        try:
            theirs = _peft_config(data, door)
        except Exception as err:
            return Verdict("mismatch", door, data, f"lorakit accepts, PEFT refuses: {type(err).__name__}: {err}"[:300])
        differences = _field_differences(ours, theirs)
        if differences:
            return Verdict("mismatch", door, data, "fields differ: " + "; ".join(differences))
        if ours.task_type not in (None, "CAUSAL_LM") or ours.init_lora_weights not in (True, False, "gaussian", "GAUSSIAN"):
            return Verdict("identical", door, data, "config only")
        return _compare_injection(data, door, ours, compare_outputs)


def _compare_injection(data, door, ours, compare_outputs) -> Verdict:
    try:
        torch.manual_seed(0)
        lk = lorakit.get_peft_model(_base(), ours).eval()
    except LorakitError as err:
        return _refused(data, door, err, peft_check=True)
    except Exception as err:  # noqa: BLE001
        return Verdict("untyped", door, data, f"injection: {type(err).__name__}: {str(err)[:300]}")
    try:
        pf = peft.get_peft_model(_base(), _peft_config(data, door)).eval()
    except Exception as err:
        return Verdict("mismatch", door, data, f"lorakit injects, PEFT fails: {type(err).__name__}: {err}"[:300])
    ours_structure = _structure(lk, LoraLayer, ModulesToSave)
    theirs_structure = _structure(pf, peft.tuners.lora.LoraLayer, peft.utils.other.ModulesToSaveWrapper)
    if ours_structure != theirs_structure:
        return Verdict("mismatch", door, data, f"adapted / saved modules differ: lorakit {ours_structure} vs "
                                               f"PEFT {theirs_structure}")
    if compare_outputs:
        with tempfile.TemporaryDirectory() as tmp:
            with torch.no_grad():
                for name, p in lk.named_parameters():
                    if p.requires_grad:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
            lk.save_pretrained(tmp)
            try:
                loaded = peft.PeftModel.from_pretrained(_base(), tmp).eval()
            except Exception as err:
                return Verdict("mismatch", door, data, f"PEFT cannot load lorakit's adapter: {type(err).__name__}: "
                                                       f"{str(err)[:200]}")
            a, b = _logits(lk), _logits(loaded)
            if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
                return Verdict("mismatch", door, data, f"logits differ by {(a - b).abs().max().item():.3g}")
    return Verdict("identical", door, data, "injected" + (" and outputs compared" if compare_outputs else ""))


# --------------------------------------------------------------------------- generating cases

def mutate(rng: random.Random, base: dict | None = None) -> dict:
    """BASE with 1-3 fields set to a hostile or plausible value (rarely, an unknown key)."""
    data = dict(base or BASE)
    for _ in range(rng.choice((1, 1, 2, 3))):
        name = rng.choice(_FIELDS + ["some_future_option"])
        pool = PLAUSIBLE.get(name) if rng.random() < 0.4 else None
        data[name] = copy.deepcopy(rng.choice(pool or HOSTILE))
    return data


BROKEN_FILES = ["[]", "null", "42", '"LORA"', '{"r": 4,', "{", "", "[" * 5000 + "]" * 5000,
                '{"r": ' + "9" * 5000 + "}", '{"peft_type": ["LORA"]}', '{"peft_type": {"a": 1}}',
                '{"peft_type": "IA3"}', "\ufeff{}", '{"r": NaN}', '{"r": Infinity}']


def run_file_case(rng: random.Random, adapter: Path, tmp: Path, index: int) -> Verdict:
    """A copy of the valid ``adapter`` directory whose adapter_config.json is mutated (or broken as
    a whole, or whose r disagrees with the tensors), loaded by lorakit's file path."""
    directory = tmp / f"case{index}"
    directory.mkdir()
    (directory / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    original = json.loads((adapter / "adapter_config.json").read_text())
    roll = rng.random()
    if roll < 0.15:
        text = rng.choice(BROKEN_FILES)
        case: Any = text[:60]
    elif roll < 0.25:
        case = {**original, "r": rng.choice([1, 2, 3, 5, 8, 1000, 100_000, 2**20])}
        text = json.dumps(case)
    else:
        case = mutate(rng, original)
        case.pop("some_future_option", None) if rng.random() < 0.5 else None
        try:
            text = json.dumps(case, allow_nan=True)
        except (ValueError, TypeError, RecursionError):
            return Verdict("identical", "file", case, "not representable in JSON: skipped")
    (directory / "adapter_config.json").write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            lorakit.LoraConfig.from_pretrained(directory)
            lorakit.PeftModel.from_pretrained(_base(), directory)
        except LorakitError as err:
            return _refused_file(directory, case, err)
        except Exception as err:  # noqa: BLE001
            return Verdict("untyped", "file", case, f"{type(err).__name__}: {str(err)[:300]}")
    try:
        peft.PeftModel.from_pretrained(_base(), str(directory))
    except Exception as err:
        return Verdict("mismatch", "file", case, f"lorakit loads it, PEFT fails: {type(err).__name__}: {err}"[:300])
    return Verdict("identical", "file", case, "loaded by both")


def _refused_file(directory: Path, case, err) -> Verdict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.PeftModel.from_pretrained(_base(), str(directory)).eval()
            works = bool(torch.isfinite(_logits(model)).all())
    except Exception:  # PEFT's own failures are of any type
        works = False
    if not works:
        return Verdict("typed", "file", case, str(err)[:200])
    reason = _deliberate(str(err))
    if reason is None:
        return Verdict("mismatch", "file", case, f"lorakit refuses, PEFT loads it: {str(err)[:300]}")
    return Verdict("deliberate", "file", case, f"{str(err)[:160]} | {reason}")


TRAIN_PLAUSIBLE: dict[str, list[Any]] = {
    "batch_size": [1, 4], "epochs": [0.5, 2], "learning_rate": [1e-4], "seed": [0, 7], "max_steps": [10, None],
    "r": [4, 8], "lora_alpha": [16], "target_modules": [["q_proj"], "all-linear"], "method": ["lora", "adalora"],
    "preset": ["conservative", "balanced"], "packing": [True, False], "precision": ["fp32"],
    "lora": [{"r": 4, "target_modules": ["q_proj"]}],
}


def run_yaml_case(rng: random.Random, tmp: Path, index: int) -> Verdict:
    """A config.yaml of flat settings (or a run's ``lora:`` mapping) with hostile values, read by
    `load_train_config`: a TrainConfig or a ConfigError, nothing else."""
    from lorakit.train.config import setting_names
    names = setting_names() + ["lora", "extra", "unknown_option"]
    data: dict[Any, Any] = {}
    for _ in range(rng.choice((1, 2, 3))):
        name = rng.choice(names)
        pool = TRAIN_PLAUSIBLE.get(name) if rng.random() < 0.4 else None
        data[name] = copy.deepcopy(rng.choice(pool or HOSTILE))
    if rng.random() < 0.1:
        data["lora"] = mutate(rng, {"r": 4, "target_modules": ["q_proj"]})
    path = tmp / f"config{index}.yaml"
    roll = rng.random()
    if roll < 0.08:
        text = rng.choice(["[]", "42", "- a\n- b", "{a: [", "a: !!python/object:os.system x", "\t:", "[" * 5000,
                           "a: " + "9" * 5000, "? [a, b]\n: 1", "1: 2", "null"])
    else:
        try:
            text = yaml.safe_dump(data, allow_unicode=True)
        except (yaml.YAMLError, RecursionError):
            return Verdict("identical", "yaml", data, "not representable in YAML: skipped")
    path.write_text(text)
    try:
        load_train_config(path)
    except LorakitError as err:
        message = str(err)
        named = str(path) in message or any(str(k) in message for k in data) or any(
            str(k) in message for k in (data.get("lora") if isinstance(data.get("lora"), dict) else {}))
        if not named:
            return Verdict("mismatch", "yaml", data, f"the error names neither the file nor a field: {message[:300]}")
        return Verdict("typed", "yaml", data, message[:200])
    except Exception as err:  # noqa: BLE001
        return Verdict("untyped", "yaml", data, f"{type(err).__name__}: {str(err)[:300]}")
    return Verdict("identical", "yaml", data, "accepted")


def valid_adapter(directory: Path) -> Path:
    """A valid lorakit adapter on the tiny Llama (r=4 on q_proj and v_proj), saved in ``directory``."""
    torch.manual_seed(0)
    model = lorakit.get_peft_model(_base(), lorakit.LoraConfig(**BASE))
    model.save_pretrained(directory)
    return directory


def campaign(seed: int, config_cases: int, file_cases: int, yaml_cases: int, compare_every: int = 5,
             workdir: Path | None = None) -> list[Verdict]:
    """``config_cases`` LoraConfig cases (kwargs and dict doors), ``file_cases`` adapter
    directories and ``yaml_cases`` config.yaml files, all from ``seed``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _campaign(random.Random(seed), config_cases, file_cases, yaml_cases, compare_every, workdir)


def _campaign(rng, config_cases, file_cases, yaml_cases, compare_every, workdir) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for i in range(config_cases):
        data = mutate(rng)
        door = "dict" if "some_future_option" in data or rng.random() < 0.3 else "kwargs"
        verdicts.append(run_config_case(data, door, compare_outputs=i % compare_every == 0))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        adapter = valid_adapter(tmp / "valid")
        for i in range(file_cases):
            verdicts.append(run_file_case(rng, adapter, tmp, i))
        for i in range(yaml_cases):
            verdicts.append(run_yaml_case(rng, tmp, i))
    return verdicts
