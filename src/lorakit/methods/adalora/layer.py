"""AdaLoRA's SVD-form adapter and the linear layer that runs it.

    y = W x + (B ((A * E) dropout(x))) * lora_alpha / (ranknum + 1e-5)      (Zhang et al. 2023)

with A (r x in) the right singular vectors Q, E (r x 1) the singular values Lambda, B (out x r)
the left singular vectors P, and ranknum = init_r (fixed: masking a triplet zeroes its E entry and
keeps the scale). Names, initialisation and scale are PEFT's (`peft.tuners.adalora.layer`), so the
same seed gives the same weights and the file keys are ``<module>.lora_A / lora_E / lora_B``.

`SVDLinear` is a `LoraLinear` (Linear, or Conv1D with ``fan_in_fan_out``) with its own forward:
the fused LoRA path does not apply to the SVD form.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from lorakit.config import LoraConfig
from lorakit.errors import AdapterFormatError, ConfigError
# inject's target matching and modules_to_save wrapping, shared with LoRA
from lorakit.inject import (
    lora_layers, match_targets, replace_module, resolve_targets, saved_modules, wrap_modules_to_save,
)
from lorakit.layer import LoraLayer, LoraLinear, is_conv1d
from lorakit.methods.adalora.config import pattern_for

__all__ = ["SVDAdapter", "SVDLinear", "inject_adalora", "svd_adapters", "svd_layer_tensors",
           "ADALORA_DEFAULT_TARGETS"]

# PEFT's AdaLoRA defaults when target_modules is None, where they differ from LoRA's.
ADALORA_DEFAULT_TARGETS = {
    "t5": ["q", "k", "v", "o", "wi", "wo"], "mt5": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], "gpt_neo": ["q_proj", "v_proj"],
    "roberta": ["query", "key", "value", "dense"], "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "deberta": ["in_proj"], "llama4": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


class SVDAdapter(nn.Module):
    """One AdaLoRA adapter on one layer: ``lora_A`` (r x in), ``lora_E`` (r x 1), ``lora_B``
    (out x r), the scale ``lora_alpha`` (PEFT: r if alpha is 0) and ``ranknum`` (a buffer)."""

    variant = None  # no `lorakit.plugins` adapter variant: SVDLinear runs the SVD form itself
    lora_magnitude_vector = None  # no DoRA magnitude

    def __init__(self, in_features: int, out_features: int, *, r: int, lora_alpha: float, ranknum: int,
                 lora_dropout: float = 0.0, init: bool = True, dtype=None, device=None):
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha if lora_alpha > 0 else float(r)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # PEFT's order of random draws (A, E, B, then one for ranknum), so that seeds agree.
        a, e, b = torch.randn(r, in_features), torch.randn(r, 1), torch.randn(out_features, r)
        torch.randn(1)
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))  # (r, in)
        self.lora_E = nn.Parameter(e.to(device=device, dtype=dtype))  # (r, 1)
        self.lora_B = nn.Parameter(b.to(device=device, dtype=dtype))  # (out, r)
        self.register_buffer("ranknum", torch.full((1,), float(ranknum), device=device, dtype=dtype),
                             persistent=False)
        if init:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def delta_weight(self) -> torch.Tensor:
        """The update ``B (A * E) * alpha / (ranknum + 1e-5)``, shape (out, in), in at least fp32."""
        a, e, b = self.lora_A, self.lora_E, self.lora_B
        if a.dtype in (torch.float16, torch.bfloat16):
            a, e, b = a.float(), e.float(), b.float()
        return b @ (a * e) * self.scaling / (self.ranknum.float() + 1e-5)  # (out, in)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, ranknum={int(self.ranknum.item())}"


class SVDLinear(LoraLinear):
    """AdaLoRA around `nn.Linear` or GPT-2's `Conv1D`; ``adapters`` holds `SVDAdapter` objects."""

    def add_adapter(self, name: str, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init=True, autocast_fp32: bool = True) -> SVDAdapter:
        """`LoraLayer.add_adapter` for the SVD form: an `SVDAdapter` of rank ``r`` whose scale
        divides by ``ranknum`` = r (`inject_adalora` then sets it to the config's init_r).
        ``use_rslora`` does not apply: AdaLoRA's scale is its own (PEFT ignores it too)."""
        weight = self.base_layer.weight
        dtype = weight.dtype
        if (autocast_fp32 and dtype in (torch.float16, torch.bfloat16)) or not dtype.is_floating_point:
            dtype = torch.float32  # adapters train in fp32 over a half-precision base, as PEFT
        adapter = SVDAdapter(self.in_features, self.out_features, r=r, lora_alpha=lora_alpha, ranknum=r,
                             lora_dropout=lora_dropout, init=bool(init), dtype=dtype, device=weight.device)
        self.adapters[name] = adapter
        return adapter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + (dropout(x) (A * E)^T B^T) * alpha / (ranknum + 1e-5)`` over the active adapters."""
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        out_dtype = result.dtype
        for a in self._adapters_for_forward():
            h = a.lora_dropout(x.to(a.lora_A.dtype))  # (..., in)
            result = result + (h @ (a.lora_A * a.lora_E).T @ a.lora_B.T) * a.scaling / (a.ranknum + 1e-5)  # (..., out)
        return result.to(out_dtype)


def svd_adapters(model: nn.Module, adapter_name: str):
    """(module name, SVDAdapter) of adapter ``adapter_name``, in module order."""
    for name, layer in lora_layers(model):
        if isinstance(layer, SVDLinear) and adapter_name in layer.adapters:
            yield name, layer.adapters[adapter_name]


def inject_adalora(model: nn.Module, config, adapter_name: str, autocast_adapter_dtype: bool = True) -> LoraConfig:
    """Add AdaLoRA adapter ``adapter_name`` to every targeted layer (in place): `SVDLinear`
    layers of rank ``config.rank_of(name)`` (init_r, or the kept triplets of a saved rank_pattern).

    Returns the config with concrete target_modules (what is saved)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is None and model_type in ADALORA_DEFAULT_TARGETS:
        config.target_modules = set(ADALORA_DEFAULT_TARGETS[model_type])
    config = resolve_targets(model, config)
    found = match_targets(model, config)
    saved_modules(model, config, adapted={name for name, _ in found})  # its errors, before any change
    for name, module in found:
        layer = module
        if isinstance(module, LoraLayer) and not isinstance(module, SVDLinear):
            raise ConfigError(f"{name} already holds LoRA adapters; AdaLoRA and LoRA adapters cannot share "
                              "a model (use a fresh copy of the base model)")
        if not isinstance(layer, SVDLinear):
            if not (isinstance(module, nn.Linear) or is_conv1d(module)):
                raise ConfigError(f"target_modules matched {name!r}, a {type(module).__name__}; AdaLoRA "
                                  "adapts Linear and Conv1D layers only: name those layers instead")
            fan_in_fan_out = is_conv1d(module)
            if fan_in_fan_out != config.fan_in_fan_out:
                warnings.warn(f"{name} is a {type(module).__name__}: using fan_in_fan_out={fan_in_fan_out}",
                              stacklevel=3)
            layer = SVDLinear(module, fan_in_fan_out=fan_in_fan_out)
            replace_module(model, name, layer)
        adapter = layer.add_adapter(adapter_name, r=config.rank_of(name), lora_alpha=config.lora_alpha,
                                    lora_dropout=config.lora_dropout, init=config.init_lora_weights,
                                    autocast_fp32=autocast_adapter_dtype)
        adapter.ranknum.fill_(config.init_r)  # the scale's divisor stays init_r whatever the rank kept
    wrap_modules_to_save(model, config, adapter_name)
    return config


def svd_layer_tensors(key: str, module_name: str, layer: LoraLayer, a: SVDAdapter,
                      config) -> dict[str, torch.Tensor]:
    """ADALORA's tensors of one layer (`lorakit.methods.Method.layer_tensors`), PEFT's keys
    ``<key>.lora_A / lora_E / lora_B`` (no ".weight"): the rows (of B, the columns) that the
    layer's rank_pattern entry marks kept, unless the layer already has exactly that many (it was
    loaded so). ``ranknum`` is not saved: it is init_r."""
    kept = pattern_for(config.rank_pattern, module_name)
    rows = a.lora_A.shape[0]
    if kept is None or sum(kept) == rows:
        return {f"{key}.lora_A": a.lora_A, f"{key}.lora_E": a.lora_E, f"{key}.lora_B": a.lora_B}
    if len(kept) != rows:
        raise AdapterFormatError(f"{key}: rank_pattern has {len(kept)} entries ({sum(kept)} kept) for a "
                                 f"layer of rank {rows}; the pattern belongs to another adapter")
    keep = torch.tensor(kept, dtype=torch.bool, device=a.lora_A.device)
    return {f"{key}.lora_A": a.lora_A[keep], f"{key}.lora_E": a.lora_E[keep], f"{key}.lora_B": a.lora_B[:, keep]}
