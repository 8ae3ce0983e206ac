"""LoRA initialisations that read the base weight W: PiSSA and OLoRA, by name.

    "pissa"           PiSSA (Meng et al. 2024, https://arxiv.org/abs/2404.02948):
                      W = V S U^T, the top r singular triplets; with S_r' = S_r / scale,
                      A = sqrt(S_r') U_r^T  (r, in),   B = V_r sqrt(S_r')  (out, r)
    "pissa_niter_N"   the same from a randomized SVD with N subspace iterations
                      (Halko et al. 2009, algorithms 4.4 and 5.1: what torch.svd_lowrank computes)
    "olora"           OLoRA (Büyükakyüz 2024, https://arxiv.org/abs/2406.01775): W = Q R,
                      A = R[:r]  (r, in),   B = Q[:, :r]  (out, r)

Both REPLACE THE BASE WEIGHT by the residual ``W_res = W - scale * B A``, so that the model with
the fresh adapter is the original model (``W_res + scale * B A = W``) while A and B start on W's
principal directions. Consequences a user must know, as in PEFT 0.21:

- ``unload()`` and ``disable_adapter()`` give the residual model, not the original one.
- An adapter saved as is (config ``init_lora_weights="pissa"``) loads correctly only onto the
  same ORIGINAL base: loading re-runs the initialisation on that base (making the residual) and
  then puts the trained A, B over it, in lorakit and in PEFT alike.
- ``save_pretrained(dir, path_initial_model_for_weight_conversion=init_dir)`` writes instead a
  plain LoRA adapter for the original base: ``B A - B0 A0 = [B, -B0] [A; A0]`` at rank 2r
  (`convert_to_lora`), where ``init_dir`` holds the adapter saved right after initialisation.

The math is fp32 whatever the base dtype; the residual is written back in the base weight's
dtype, and A, B pass through that dtype before the adapter's own, as PEFT's do. Embedding
layers keep LoRA's default init and their table (PEFT does the same); OLoRA on a layer stored
(in, out) (GPT-2's Conv1D) is refused: PEFT 0.21 takes the QR of the transposed weight there,
which fails or changes the model, so no adapter would load in PEFT with the same outputs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Callable

import torch
import torch.nn as nn

from lorakit.config import PISSA_NITER
from lorakit.errors import AdapterFormatError, CompatibilityError, ConfigError
from lorakit.inject import match_targets, pattern_value, resolve_targets
from lorakit.plugins import BaseWeightInit, register_init, register_operation

__all__ = ["INITS", "parse", "uses_base_weight", "init_from_base", "layer_problem", "check_targets",
           "randomized_svd", "convert_to_lora", "converted_config", "converted", "NITER_SEED", "FROM_BASE"]

NITER_SEED = 0
"""The seed of the randomized SVD's sketch: "pissa_niter_N" gives the same residual on every
run and device, so a lorakit save reloads exactly (PEFT draws from the global generator)."""


def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """PiSSA's A (r, in) and B (out, r) from W (out, in), fp32; the exact SVD when niter is None."""
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight, full_matrices=False)  # (out, k), (k,), (k, in)
        Vr, Sr, Uhr = V[:, :r], S[:r] / scaling, Uh[:r]
    else:
        Vr, Sr, Ur = randomized_svd(weight, r, niter)
        Sr, Uhr = Sr / scaling, Ur.T
    lora_A = Sr.sqrt()[:, None] * Uhr  # (r, in)
    lora_B = Vr * Sr.sqrt()[None, :]  # (out, r)
    return lora_A, lora_B


def olora(weight: torch.Tensor, r: int, scaling: float):
    """OLoRA's A (r, in) and B (out, r) from W (out, in), fp32: the first r columns of Q, rows of R."""
    Q, R = torch.linalg.qr(weight)  # (out, k), (k, in)
    return R[:r].contiguous(), Q[:, :r].contiguous()


INITS: dict[str, Callable] = {"pissa": pissa, "olora": olora}
"""Initialisations that read the base weight, by name; ``f(W (out, in) fp32, r, scale) -> A, B``.
True, "gaussian" and False (no base weight needed) live in `lorakit.layer.Adapter`."""


def randomized_svd(weight: torch.Tensor, q: int, niter: int):
    """``U (m, q), S (q,), V (n, q)`` with ``W ~ U diag(S) V^T``: torch.svd_lowrank's algorithm
    (Halko et al. 2009), with its Gaussian sketch drawn from a generator seeded `NITER_SEED` on
    the CPU instead of the global one: reproducible, and the caller's random state is untouched."""
    tall = weight.shape[0] >= weight.shape[1]
    M = weight if tall else weight.T  # (m, n), m >= n
    g = torch.Generator().manual_seed(NITER_SEED)
    R = torch.randn(M.shape[1], q, generator=g, dtype=M.dtype).to(M.device)  # (n, q)
    Q = torch.linalg.qr(M @ R).Q  # (m, q)
    for _ in range(niter):
        Q = torch.linalg.qr(M.mH @ Q).Q  # (n, q)
        Q = torch.linalg.qr(M @ Q).Q  # (m, q)
    U, S, Vh = torch.linalg.svd(Q.mH @ M, full_matrices=False)  # (q, q), (q,), (q, n)
    U, V = Q @ U, Vh.mH  # (m, q), (n, q)
    return (U, S, V) if tall else (V, S, U)


def parse(init) -> tuple[str, dict] | None:
    """("pissa", {}), ("pissa", {"niter": N}) or ("olora", {}); None for inits that do not read W."""
    if not isinstance(init, str):
        return None
    if init == "pissa":
        return "pissa", {}
    match = PISSA_NITER.fullmatch(init)
    if match:
        return "pissa", {"niter": int(match.group(1))}
    if init.lower() == "olora":  # PEFT compares OLoRA's name in lower case
        return "olora", {}
    return None


def uses_base_weight(init) -> bool:
    """True for the inits that replace the base weight by a residual (PiSSA, OLoRA)."""
    return parse(init) is not None


def layer_problem(layer, r: int, init) -> str | None:
    """Why ``init`` cannot run on this LoRA layer (None when it can)."""
    parsed = parse(init)
    if parsed is None or layer.is_embedding:
        return None
    weight = layer.base_layer.weight
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return (f"its weight is {weight.dtype}: {init!r} needs a float32, float16 or bfloat16 base "
                "(initialise before quantizing, then quantize the residual model)")
    if parsed[0] == "olora" and getattr(layer, "fan_in_fan_out", False):
        return ("its weight is stored (in, out) (fan_in_fan_out, GPT-2's Conv1D): PEFT 0.21 runs OLoRA "
                "on the transposed weight there, which fails or changes the model, so the adapter would "
                "not load in PEFT with the same outputs; use 'pissa' or target nn.Linear layers")
    k = min(layer.in_features, layer.out_features)
    if r > k:
        return (f"r={r} exceeds min(in, out)={k}: {init!r} takes r singular directions of the weight; "
                f"lower r for it (rank_pattern) to at most {k}")
    return None


def init_from_base(layer, adapter, init) -> None:
    """Set ``adapter``'s A and B from ``layer``'s base weight W and replace W by the residual
    ``W - scale * B A`` (in place, in W's dtype). Embeddings keep the init they already have."""
    name, kwargs = parse(init)
    if layer.is_embedding:
        warnings.warn(f"init_lora_weights={init!r} does not apply to embedding layers: they keep "
                      "LoRA's default init (A = 0, B ~ N(0, 1)) and their table, as in PEFT",
                      stacklevel=4)
        return
    problem = layer_problem(layer, adapter.r, init)
    if problem:
        raise ConfigError(f"init_lora_weights={init!r} cannot initialise this layer: {problem}")
    weight = layer.base_layer.weight
    fan_in_fan_out = getattr(layer, "fan_in_fan_out", False)
    with torch.no_grad():
        W = weight.to(torch.float32)
        W = W.T if fan_in_fan_out else W  # (out, in)
        lora_A, lora_B = INITS[name](W, adapter.r, adapter.scaling, **kwargs)  # (r, in), (out, r)
        residual = W - (adapter.scaling * lora_B) @ lora_A  # (out, in)
        weight.copy_((residual.T if fan_in_fan_out else residual).to(weight.dtype))
        adapter.lora_A.copy_(lora_A.to(weight.dtype))
        adapter.lora_B.copy_(lora_B.to(weight.dtype))


def check_targets(model, config) -> None:
    """Check every layer ``config`` targets before any base weight changes, so that a refused
    layer never leaves the model half initialised; one ConfigError lists them all."""
    if not uses_base_weight(config.init_lora_weights):
        return
    config = resolve_targets(model, config)
    problems = []
    for name, module in match_targets(model, config):
        layer = module if hasattr(module, "adapters") else _Probe(module, config.fan_in_fan_out)
        problem = layer_problem(layer, pattern_value(config.rank_pattern, name, config.r),
                                config.init_lora_weights)
        if problem:
            problems.append(f"{name}: {problem}")
    if problems:
        raise ConfigError(f"init_lora_weights={config.init_lora_weights!r} cannot initialise these "
                          "layers (the model is unchanged):\n  - " + "\n  - ".join(problems))


class _Probe:
    """The view of a not yet wrapped layer that `layer_problem` needs."""

    def __init__(self, module, fan_in_fan_out: bool):
        self.base_layer = module
        self.is_embedding = isinstance(module, nn.Embedding)
        conv1d = type(module).__name__ == "Conv1D"
        self.fan_in_fan_out = conv1d or (fan_in_fan_out and not isinstance(module, nn.Linear))
        w = module.weight
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.fan_in_fan_out \
            else (w.shape[1], w.shape[0])


# --------------------------------------------------------------------------- conversion to LoRA

_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")


def convert_to_lora(tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor],
                    source: str) -> dict[str, torch.Tensor]:
    """The trained adapter as a plain LoRA adapter for the ORIGINAL base (PEFT's conversion):

        W_res + s B A = W + s (B A - B0 A0) = W + s [B, -B0] [A; A0]

    so ``A' = [A; A0]`` (2r, in) and ``B' = [B, -B0]`` (out, 2r), with A0, B0 the adapter saved
    right after initialisation (``initial``). Other tensors (biases, modules_to_save) pass
    unchanged; PEFT drops them, and embedding adapters too, lorakit keeps them."""
    ab = [k for k in tensors if k.endswith(_A_SUFFIXES + _B_SUFFIXES)]
    missing = sorted(k for k in ab if k not in initial)
    wrong = sorted(f"{k}: initial {tuple(initial[k].shape)}, trained {tuple(tensors[k].shape)}"
                   for k in ab if k in initial and initial[k].shape != tensors[k].shape)
    if missing:
        raise AdapterFormatError(f"{source}: the initial adapter lacks tensors of the trained one "
                                 f"(is it the adapter saved right after initialisation?): {missing[:20]}")
    if wrong:
        raise CompatibilityError(f"{source}: the initial adapter's shapes differ from the trained "
                                 "one's (another rank or model?):\n  - " + "\n  - ".join(wrong))
    out = {}
    for key, t in tensors.items():
        t = t.detach()
        if key.endswith(_A_SUFFIXES):
            t = torch.cat([t, initial[key].to(t)], dim=0)  # (2r, in)
        elif key.endswith(_B_SUFFIXES):
            t = torch.cat([t, -initial[key].to(t)], dim=1)  # (out, 2r)
        out[key] = t
    return out


def converted_config(config):
    """The converted adapter's config: init True, every rank doubled and alpha changed so that
    every module keeps its scale: alpha x 2 (alpha/r), alpha x sqrt 2 with rsLoRA (alpha/sqrt r),
    alpha_pattern included (PEFT doubles it even with rsLoRA, so it refuses that case)."""
    if config.init_lora_weights is False:
        raise ConfigError("path_initial_model_for_weight_conversion: this adapter was initialised with "
                          "init_lora_weights=False (a random, non-zero B0 A0), so B A - B0 A0 is not the "
                          "fine-tuned model; save it without the argument")
    if getattr(config, "use_dora", False):
        raise ConfigError("path_initial_model_for_weight_conversion: a DoRA adapter's update is not "
                          "linear in B A, so it has no rank-2r LoRA form; save it without the argument")
    factor = math.sqrt(2) if config.use_rslora else 2
    return dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()},
    )


def converted(config, tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor], source: str):
    """(`converted_config`, `convert_to_lora`): the adapter and its config as a plain LoRA adapter
    for the original base (``save_pretrained(..., path_initial_model_for_weight_conversion=...)``)."""
    return converted_config(config), convert_to_lora(tensors, initial, source)


def warn_if_randomized(init, event: str) -> None:
    """The warning "pissa_niter_N" needs on save and load: the residual depends on the random
    sketch, which PEFT draws from its global generator and lorakit from a fixed seed."""
    parsed = parse(init)
    if parsed is None or "niter" not in parsed[1]:
        return
    warnings.warn(
        f"{event} with init_lora_weights={init!r}: loading it re-runs the randomized SVD on the base "
        f"to rebuild the residual. lorakit seeds that SVD (seed {NITER_SEED}), so an adapter trained "
        "with lorakit reloads exactly in lorakit; PEFT draws it from its global random state, so "
        "across the two libraries the residual, and the outputs, differ from the trained model's. "
        "For an exact adapter everywhere, save it with path_initial_model_for_weight_conversion "
        "(a plain LoRA adapter for the original base) or initialise with 'pissa'", stacklevel=3)


# --------------------------------------------------------------------------- registration

FROM_BASE = register_init(BaseWeightInit(
    handles=uses_base_weight, check_targets=check_targets, init_from_base=init_from_base,
    warn_on_reload=warn_if_randomized,
))
"""PiSSA's and OLoRA's entry in `lorakit.plugins`: `lorakit.layer` runs ``init_from_base`` for an
adapter whose init_lora_weights this handles; `lorakit.model` checks the targets first and warns on
save and load."""
register_operation("convert_to_lora", converted)
