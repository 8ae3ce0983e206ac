"""Adapter arithmetic: a new adapter from a weighted combination of existing ones.

Each input adapter i adds, on every layer it adapts, the update

    dW_i = s_i B_i A_i        A_i (r_i, in), B_i (out, r_i), s_i = alpha_i / r_i   (or alpha_i / sqrt(r_i), rsLoRA)

and is given a weight w_i; write t_i = w_i s_i. The new adapter stores A (R, in) and B (out, R) and
has its own scaling s (alpha / R, or alpha / sqrt(R) with rsLoRA), so its update is s B A. Every
combination below divides s out, so the update means what the formula says whatever s is.

    cat     A = [t_1 A_1; ...; t_n A_n] / s,  B = [B_1 ... B_n]           R = sum_i r_i
            s B A = sum_i w_i dW_i exactly (task arithmetic, Ilharco et al. 2023,
            https://arxiv.org/abs/2212.04089, done without approximation).
    svd     U S V^T = svd(sum_i w_i dW_i);  B = U_k S_k / s,  A = V_k^T     R = k
            the best rank-k approximation (Eckart-Young); exact when k >= sum_i r_i.
    linear  T = sum_i t_i;  Abar = sum_i (t_i / T) A_i,  Bbar = sum_i (t_i / T) B_i;
            s B A = T Bbar Abar                                             R = r (all equal)
            a combination of the factors, not of the updates: exact (= w dW) for one adapter and
            for identical adapters, of any sign; the cross terms B_i A_j make it an
            approximation otherwise.

Where lorakit differs from PEFT 0.21 (`LoraModel.add_weighted_adapter`):
  - PEFT leaves the new adapter's scaling in (right only when it is 1, i.e. not with rsLoRA,
    where it is sqrt(R)); lorakit divides it out for all three types.
  - PEFT's "linear" uses the coefficients sqrt(|t_i|) (the sign on A), so n identical adapters
    give (sum_i sqrt|t_i|)^2 BA instead of (sum_i t_i) BA: twice the update for weights
    [0.5, 0.5]. With one adapter both agree.
  - PEFT's "svd" with k above min(out, in) stores a factor of the wrong shape; lorakit pads
    with zeros.
  - PEFT gives the new adapter an untrained copy of a modules_to_save module; lorakit copies
    the trained one of the single input that saves it.
  - An existing adapter_name, a weights list of another length, density on a type that
    ignores it, or "linear" weights with sum_i t_i = 0 on a layer are errors here, not silently
    skipped (or NaN).
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
from functools import partial, reduce
from typing import Callable, NamedTuple, Optional

import torch

from lorakit.errors import ConfigError
from lorakit.inject import ModulesToSave, logical_modules, lora_layers
from lorakit.plugins import register_operation

__all__ = [
    "Part", "combine_cat", "combine_linear", "combine_svd", "COMBINATIONS", "UNSUPPORTED",
    "new_rank", "add_weighted_adapter",
]


class Part(NamedTuple):
    """One input adapter on one layer: its factors and t = weight * scaling."""

    A: torch.Tensor  # (r_i, in)
    B: torch.Tensor  # (out, r_i)
    t: float


# --------------------------------------------------------------------------- the math

def combine_cat(parts: list[Part], rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = [t_1 A_1; ...; t_n A_n] / s``, ``B = [B_1 ... B_n]``, zero-padded to ``rank`` rows.

    ``s B A = sum_i t_i B_i A_i = sum_i w_i dW_i`` exactly (rank sum_i r_i)."""
    A = torch.cat([p.A * p.t for p in parts], dim=0) / scale  # (sum r_i, in)
    B = torch.cat([p.B for p in parts], dim=1)  # (out, sum r_i)
    return _pad(A, B, rank)


def combine_svd(parts: list[Part], rank: int, scale: float, clamp: Optional[float] = None,
                full_matrices: bool = True, driver: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` approximation of ``dW = sum_i t_i B_i A_i`` (Eckart-Young).

        U S V^T = svd(dW);   B = U[:, :k] diag(S[:k]) / s,   A = V^T[:k]

    ``clamp`` (PEFT's ``svd_clamp``): the ``clamp`` quantile q of the entries of U_k S_k and
    V^T_k together; both are clamped to [-q, q] (before dividing by s). Computed in float64,
    so that the factors are right to the last bit of their fp32 storage."""
    delta = sum(p.t * (p.B.double() @ p.A.double()) for p in parts)  # (out, in)
    U, S, Vh = torch.linalg.svd(delta, full_matrices=full_matrices, driver=driver)
    k = min(rank, S.numel())  # a rank above min(out, in) is zero-padded below
    B = U[:, :k] @ torch.diag(S[:k])  # (out, k)
    A = Vh[:k, :]  # (k, in)
    if clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return _pad(A, B / scale, rank)


def combine_linear(parts: list[Part], rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``s B A = T Bbar Abar`` with ``T = sum_i t_i`` and the t-weighted mean factors
    ``Abar = sum_i (t_i/T) A_i``, ``Bbar = sum_i (t_i/T) B_i``; stored as
    ``A = sign(T) sqrt|T| Abar``, ``B = sqrt|T| Bbar / s`` (PEFT's split for one adapter)."""
    ranks = {p.A.shape[0] for p in parts}
    if len(ranks) != 1:
        raise ConfigError(f"combination_type='linear' adds the factors A_i and B_i, which needs one "
                          f"rank on every layer; this layer has ranks {sorted(ranks)}: use 'cat' or 'svd'")
    total = sum(p.t for p in parts)
    if total == 0:
        raise ConfigError("combination_type='linear': the weights times the scalings sum to 0 on a "
                          "layer, so the weighted mean of the factors is undefined; use 'cat' or "
                          "'svd' (exact: they give the zero update the weights ask for)")
    root = math.sqrt(abs(total))
    A = sum(p.A * (math.copysign(root, total) * p.t / total) for p in parts)  # (r, in)
    B = sum(p.B * (root * p.t / total) for p in parts) / scale  # (out, r)
    return _pad(A, B, rank)


def _pad(A: torch.Tensor, B: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero rows of A and columns of B up to ``rank`` (they add nothing to B A)."""
    extra = rank - A.shape[0]
    if extra > 0:
        A = torch.cat([A, A.new_zeros(extra, A.shape[1])], dim=0)  # (rank, in)
        B = torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)  # (out, rank)
    return A, B


Combine = Callable[[list[Part], int, float], tuple[torch.Tensor, torch.Tensor]]

COMBINATIONS: dict[str, Combine] = {"cat": combine_cat, "linear": combine_linear, "svd": combine_svd}

# PEFT's other combination types (pruning / sign election, random dropping).
UNSUPPORTED = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
               "magnitude_prune", "magnitude_prune_svd")


def new_rank(combination_type: str, ranks: list[int], svd_rank: Optional[int]) -> int:
    """PEFT's rule: linear keeps the common rank, cat sums the ranks, svd takes svd_rank or the
    largest rank."""
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ConfigError(f"combination_type='linear' needs adapters of one rank, got ranks {ranks}; "
                              "use 'cat' (exact) or 'svd' for adapters of different ranks")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


# --------------------------------------------------------------------------- on a PeftModel

SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


def add_weighted_adapter(model, adapters: list[str], weights: list[float], adapter_name: str,
                         combination_type: str = "svd", svd_rank: Optional[int] = None,
                         svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                         svd_driver: Optional[str] = None, density: Optional[float] = None,
                         majority_sign_method: str = "total") -> None:
    """Add ``adapter_name`` to the `PeftModel` ``model``: the combination ``combination_type``
    ("cat", "linear" or "svd", see the module docstring) of ``adapters`` with ``weights``.

    As in PEFT, the new adapter copies the first input's config with ``r = lora_alpha = R`` and
    no rank or alpha patterns, targets the union of the inputs' target modules, is frozen and not
    made active; one input adapter always combines as "linear" (exact), unless "svd" is asked
    with an ``svd_rank``. Unlike PEFT, it lives on exactly the layers the inputs adapt (module
    names are listed when the inputs differ in layers_to_transform, layers_pattern or
    exclude_modules), and a modules_to_save copy takes the trained values of the one input that
    has it."""
    weights = _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank,
                               svd_clamp, svd_full_matrices, svd_driver, density, majority_sign_method)
    if len(adapters) == 1 and not (combination_type == "svd" and svd_rank is not None):
        combination_type = "linear"
    configs = [model.peft_config[a] for a in adapters]
    rank = new_rank(combination_type, [max([c.r, *c.rank_pattern.values()]) for c in configs], svd_rank)
    config = _new_config(configs, rank, _held(model, adapters))
    scale = config.lora_alpha / math.sqrt(rank) if config.use_rslora else config.lora_alpha / rank
    combine = COMBINATIONS[combination_type]
    if combination_type == "svd":
        combine = partial(combine_svd, clamp=svd_clamp, full_matrices=svd_full_matrices, driver=svd_driver)
    base = model.get_base_model()
    factors = {}  # computed in full before the model changes, so an error leaves it as it was
    with torch.no_grad():
        for name, layer in lora_layers(base):
            parts = [Part(_fp32(layer.adapters[a].lora_A), _fp32(layer.adapters[a].lora_B),
                          w * layer.adapters[a].scaling)
                     for a, w in zip(adapters, weights) if a in layer.adapters]
            if parts:
                try:
                    factors[name] = combine(parts, rank, scale)
                except ConfigError as err:
                    raise ConfigError(f"add_weighted_adapter, layer {name}: {err}") from None

    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for name, layer in lora_layers(base):
            if adapter_name in layer.adapters:
                new = layer.adapters[adapter_name]
                # a layer matched by the union of targets but adapted by no input: no update
                A, B = factors.get(name, (torch.zeros_like(new.lora_A), torch.zeros_like(new.lora_B)))
                new.lora_A.copy_(A)
                new.lora_B.copy_(B)
        _copy_modules_to_save(base, adapters, adapter_name)
    for p in _adapter_parameters(base, adapter_name):
        p.requires_grad_(False)  # PEFT freezes the new adapter; set_adapter makes it trainable


def _held(model, adapters) -> set[str]:
    """The layers that at least one of ``adapters`` adapts."""
    return {name for name, layer in lora_layers(model.get_base_model())
            if any(a in layer.adapters for a in adapters)}


def _check_arguments(model, adapters, weights, adapter_name, combination_type, svd_rank, svd_clamp,
                     svd_full_matrices, svd_driver, density, majority_sign_method) -> list[float]:
    """Every problem with the arguments, in one ConfigError; returns the weights as floats."""
    problems = []
    known = sorted(model.peft_config)
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        problems.append(f"adapters={adapters!r}: must be a non-empty list of adapter names")
        adapters = []
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        problems.append(f"adapters {unknown} do not exist; adapters: {known}")
    if adapter_name in model.peft_config:
        problems.append(f"adapter_name={adapter_name!r} already exists; pick another name or "
                        "delete_adapter() it first")
    try:
        weights = [float(w) for w in weights]
    except (TypeError, ValueError):
        problems.append(f"weights={weights!r}: must be a list of numbers, one per adapter")
        weights = []
    if weights and len(weights) != len(adapters):
        problems.append(f"got {len(weights)} weights for {len(adapters)} adapters: give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        problems.append(f"weights={weights}: must be finite numbers")
    if combination_type not in COMBINATIONS:
        what = ("PEFT's pruning and DARE merges are not available in lorakit"
                if combination_type in UNSUPPORTED else "unknown combination type")
        problems.append(f"combination_type={combination_type!r}: {what}; lorakit supports "
                        f"{', '.join(map(repr, COMBINATIONS))}")
    if density is not None:
        problems.append(f"density={density!r}: applies to the ties / dare / magnitude_prune merges, "
                        "which lorakit does not have; drop the argument")
    if majority_sign_method != "total":
        problems.append(f"majority_sign_method={majority_sign_method!r}: applies to the ties merges, "
                        "which lorakit does not have; drop the argument")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
        problems.append(f"svd_rank={svd_rank!r}: must be a positive integer (or None: the largest input rank)")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        problems.append(f"svd_clamp={svd_clamp!r}: a quantile in [0, 1] (or None: no clamping)")
    if svd_driver not in SVD_DRIVERS:
        problems.append(f"svd_driver={svd_driver!r}: one of {SVD_DRIVERS}")
    elif svd_driver is not None and not _on_cuda(model, adapters):
        problems.append(f"svd_driver={svd_driver!r}: torch chooses the SVD driver on CUDA only; "
                        "leave it None for adapters on the CPU")
    svd_options = {"svd_rank": svd_rank, "svd_clamp": svd_clamp, "svd_driver": svd_driver,
                   "svd_full_matrices": None if svd_full_matrices is True else svd_full_matrices}
    set_options = [k for k, v in svd_options.items() if v is not None]
    if combination_type in ("cat", "linear") and set_options:
        problems.append(f"{', '.join(set_options)}: apply to combination_type='svd' only, "
                        f"not {combination_type!r}; drop them")
    problems += _config_problems(model, adapters) if not unknown else []
    if problems:
        raise ConfigError("add_weighted_adapter:\n  - " + "\n  - ".join(problems))
    return weights


def _config_problems(model, adapters) -> list[str]:
    configs = [model.peft_config[a] for a in adapters]
    problems = [f"adapter {a!r} is not a plain LoRA adapter (peft_type={c.peft_type!r}, "
                f"use_dora={getattr(c, 'use_dora', False)}); only LoRA adapters combine"
                for a, c in zip(adapters, configs)
                if c.peft_type not in ("LORA", None) or getattr(c, "use_dora", False)]
    if len({isinstance(c.target_modules, str) for c in configs}) > 1:
        problems.append("the adapters mix target_modules given as a regular expression and as a "
                        "list; give them all in one form")
    owners: dict[str, list[str]] = {}
    for name, module in _modules_to_save(model.get_base_model()):
        owners[name] = [a for a in adapters if a in module.modules_to_save]
    clashes = sorted(n for n, o in owners.items() if len(o) > 1)
    if clashes:
        problems.append(f"several of the adapters save the same modules in full ({clashes}); "
                        "full modules cannot be weighted: combine adapters that save different ones")
    return problems


def _new_config(configs, rank: int, held: set[str]):
    """PEFT's new config (the first input's, r = lora_alpha = rank, the union of the targets),
    with the union of the modules_to_save; the exact layer names when the inputs restrict their
    targets differently."""
    first = configs[0]
    if isinstance(first.target_modules, str):
        targets = "|".join(f"({c.target_modules})" for c in configs)
    else:
        targets = reduce(operator.or_, (set(c.target_modules) for c in configs))
    saved = list(dict.fromkeys(m for c in configs for m in c.modules_to_save or ()))
    config = dataclasses.replace(first, r=rank, lora_alpha=rank, target_modules=targets, alpha_pattern={},
                                 rank_pattern={}, modules_to_save=saved or None)
    both = sorted(n for n in held for m in saved if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", n))
    if both:
        raise ConfigError(f"add_weighted_adapter: layers {both} carry LoRA in one input adapter and "
                          "are saved in full by another; combine adapters that treat them alike")
    restrictions = ("layers_to_transform", "layers_pattern", "exclude_modules")
    if any(getattr(c, f) != getattr(first, f) for c in configs for f in restrictions):
        config = dataclasses.replace(config, target_modules=sorted(held), layers_to_transform=None,
                                     layers_pattern=None, exclude_modules=None)
    return config


def _copy_modules_to_save(base, adapters, adapter_name) -> None:
    for _, module in _modules_to_save(base):
        owners = [a for a in adapters if a in module.modules_to_save]
        if adapter_name in module.modules_to_save and len(owners) == 1:
            module.modules_to_save[adapter_name].load_state_dict(module.modules_to_save[owners[0]].state_dict())


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float() if t.dtype in (torch.float16, torch.bfloat16) else t.detach()


def _on_cuda(model, adapters) -> bool:
    return any(p.is_cuda for a in adapters for p in _adapter_parameters(model.get_base_model(), a))


def _modules_to_save(base) -> list[tuple[str, ModulesToSave]]:
    return [(n, m) for n, m in logical_modules(base) if isinstance(m, ModulesToSave)]


def _adapter_parameters(base, adapter_name):
    for _, layer in lora_layers(base):
        if adapter_name in layer.adapters:
            yield from layer.adapters[adapter_name].parameters()
    for _, module in _modules_to_save(base):
        if adapter_name in module.modules_to_save:
            yield from module.modules_to_save[adapter_name].parameters()


# PeftModel.add_weighted_adapter runs this (`lorakit.plugins`).
register_operation("add_weighted_adapter", add_weighted_adapter)
