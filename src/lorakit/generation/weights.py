"""The decoder's weights: a Llama-family model's frozen weights packed for decoding, and its adapters.

Per decoder layer the decoder runs three matrix products where the model runs seven: q, k and v
are one ``qkv`` weight (q rows, then k, then v), gate and up one ``gate_up`` weight, and o and
down as they are. The packed weights are copies in the decoder's dtype (bf16 halves the bytes
read per token); the model's own weights are never written, so switching adapters is exact.

- `pack(model, dtype, merged=name)`: the weights with adapter ``name`` merged in
  (``W + scale * B A``, computed in fp32 from the layer's base weight, then cast): one adapter for
  every row costs nothing per token. ``merged=None``: the base weights alone.
- `AdapterStack`: every adapter of the model packed the same way, for batches whose rows use
  different adapters: for the packed ``qkv`` weight, A is ``[A_q; A_k; A_v]`` and B the block
  diagonal of ``s B_q, s B_k, s B_v`` (scale folded in), padded with zeros to one rank per
  adapter, so that a row's update is two batched products over its own adapter's slice
  (`AdapterStack.rows`). Row index 0 is the base model (zeros).

Only what the decoder can run exactly as the model does is packed; `unsupported` says why a model
is not (then the engine runs the model itself).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.batching import BASE
from lorakit.layer import LoraLayer

__all__ = ["FAMILY", "Packed", "LayerWeights", "AdapterStack", "pack", "unsupported", "adapter_names"]

FAMILY = frozenset({"llama", "mistral", "qwen2"})
"""Model types whose decoder layer is exactly ``x + o(attn(rope(q), rope(k), v))``, then
``x + down(silu(gate) * up)``, each behind an RMSNorm: the ones the decoder runs."""

_PARTS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
          "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}


class Matrix:
    """``x @ W^T (+ bias)`` for one frozen weight W (out, in): on a CPU with oneDNN, W (bf16 or
    fp32) is packed once into oneDNN's blocked layout, the layout its kernels read fastest (for one
    row, about twice the memory bandwidth of ``F.linear`` on a plain tensor in either dtype:
    a decode step reads every weight once); elsewhere (CUDA) ``F.linear``."""

    __slots__ = ("weight", "bias", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias, self.packed = weight, bias, None
        if weight.device.type == "cpu" and _onednn(weight.dtype):
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
            self.weight = None  # the packed copy is all a product reads: one copy of the weights, not two

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


@functools.cache
def _onednn(dtype: torch.dtype) -> bool:
    """Whether oneDNN's packed products run ``dtype`` on this CPU (bf16 only where it is native)."""
    try:
        if dtype not in (torch.bfloat16, torch.float32) or not torch.backends.mkldnn.is_available() \
                or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
            return False
        if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        # one small product, packed and plain, must agree: a build whose oneDNN cannot pack falls back
        # (fixed values: the probe leaves the global random state alone)
        weight = torch.linspace(-1, 1, 24 * 16).view(24, 16).to(dtype)
        x = torch.linspace(1, -1, 2 * 16).view(2, 16).to(dtype)
        packed = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(weight, 1), None,
                                                    "none", [], "")
        return bool(torch.allclose(packed.float(), F.linear(x, weight).float(), rtol=0.02, atol=0.02))
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


@dataclass
class LayerWeights:
    """One decoder layer's products; the RMSNorm weights are folded into ``qkv`` and ``gate_up``."""

    qkv: Matrix  # (q + k + v outputs, hidden), with q, k, v's biases where the model has them
    o: Matrix  # (hidden, heads * head_dim)
    gate_up: Matrix  # (2 * intermediate, hidden)
    down: Matrix  # (hidden, intermediate)


@dataclass
class Packed:
    """A model's weights for the decoder, with at most one adapter merged in."""

    layers: list[LayerWeights]
    head: Matrix  # (vocab, hidden), the LM head (a copy even when tied), the final RMSNorm's weight folded in
    merged: str | None  # the adapter merged in, None: the base model


def base_model(model) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _linear(module: nn.Module) -> nn.Module:
    return module.base_layer if isinstance(module, LoraLayer) else module


def adapter_names(model) -> list[str]:
    config = getattr(model, "peft_config", None)
    return sorted(config) if isinstance(config, dict) else []


def unsupported(model) -> str | None:
    """Why the decoder cannot run ``model`` (None: it can)."""
    base = base_model(model)
    config = getattr(base, "config", None)
    kind = getattr(config, "model_type", None)
    if kind not in FAMILY:
        return f"model type {kind!r} (the decoder runs {', '.join(sorted(FAMILY))})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    inner = getattr(base, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(base, "lm_head"):
        return "not a causal LM with model.layers and lm_head"
    projections = {p for _, parts in _PARTS.values() for p in parts}
    for name, module in base.named_modules():
        short = name.rsplit(".", 1)[-1]
        if type(module).__name__ == "ModulesToSave":
            return f"modules_to_save ({name})"
        if isinstance(module, LoraLayer):
            if short not in projections | {"lm_head"} or module.is_embedding:
                return f"an adapter on {name} (the decoder adapts the attention and MLP projections)"
            if any(a.variant is not None for a in module.adapters.values()):
                return f"an adapter variant on {name} (DoRA)"
        if short in projections | {"lm_head"} and ".base_layer" not in name:
            if type(_linear(module)) is not nn.Linear:
                return f"{name} is a {type(_linear(module)).__name__}, not a plain nn.Linear (quantized?)"
            if short in ("o_proj", "down_proj", "gate_proj", "up_proj", "lm_head") and _linear(module).bias is not None:
                return f"{name} has a bias"
    return None


def _weight(module: nn.Module, adapter: str | None) -> torch.Tensor:
    """The module's weight (out, in) in fp32 with ``adapter`` merged in, if it adapts this module."""
    weight = _linear(module).weight.detach().float()
    if isinstance(module, LoraLayer) and adapter is not None and adapter in module.adapters:
        weight = weight + module.delta_in_weight_layout(adapter).detach().float()
    return weight


def _bias(modules: list[nn.Module], dtype) -> torch.Tensor | None:
    biases = [_linear(m).bias for m in modules]
    if all(b is None for b in biases):
        return None
    return torch.cat([(b.detach() if b is not None else torch.zeros(_linear(m).out_features, device=_linear(m).weight.device))
                      .float() for b, m in zip(biases, modules)]).to(dtype)


def pack(model, dtype: torch.dtype, merged: str | None = None) -> Packed:
    """The model's weights packed in ``dtype``, with adapter ``merged`` merged in (None: none)."""
    base = base_model(model)
    layers = []
    with torch.no_grad():
        for layer in base.model.layers:
            got = {}
            norms = _norms(layer)
            for part, (where, names) in _PARTS.items():
                modules = [getattr(getattr(layer, where), n) for n in names]
                weight = torch.cat([_weight(m, merged) for m in modules])
                if part in norms:  # RMSNorm's weight w before this product: W (w * x) = (W * w) x
                    weight = weight * norms[part]
                got[part] = weight.to(dtype).contiguous()
                if part == "qkv":
                    got["qkv_bias"] = _bias(modules, dtype)
            layers.append(LayerWeights(Matrix(got["qkv"], got["qkv_bias"]), Matrix(got["o"]), Matrix(got["gate_up"]),
                                       Matrix(got["down"])))
        final = _norm_factor(base.model.norm)
        head = Matrix((_weight(base.lm_head, merged) * final).to(dtype).contiguous())
    return Packed(layers, head, merged)


def _norms(layer: nn.Module) -> dict[str, torch.Tensor]:
    """What multiplies the decoder's normed input of each packed product that reads one, fp32: the
    RMSNorm's weight and ``sqrt(hidden)`` (`Decoder._normalized` leaves both out)."""
    return {"qkv": _norm_factor(layer.input_layernorm), "gate_up": _norm_factor(layer.post_attention_layernorm)}


def _norm_factor(norm: nn.Module) -> torch.Tensor:
    weight = norm.weight.detach().float()
    return weight * weight.numel() ** 0.5


class AdapterStack:
    """Every adapter's A and B per packed weight, for rows that use different adapters.

    ``a[layer][part]`` is (adapters + 1, R, in) and ``b[layer][part]`` (adapters + 1, out, R), the
    scale folded into B; index 0 is the base model (zeros) and index i the i-th of ``names``."""

    def __init__(self, model, dtype: torch.dtype):
        self.names = adapter_names(model)
        self.index = {BASE: 0, None: 0, **{n: i + 1 for i, n in enumerate(self.names)}}
        self.a: list[dict[str, torch.Tensor]] = []
        self.b: list[dict[str, torch.Tensor]] = []
        with torch.no_grad():
            for layer in base_model(model).model.layers:
                a_parts, b_parts = {}, {}
                norms = _norms(layer)
                for part, (where, names) in _PARTS.items():
                    modules = [getattr(getattr(layer, where), n) for n in names]
                    if not any(isinstance(m, LoraLayer) for m in modules):
                        continue
                    a_parts[part], b_parts[part] = self._stack(modules, dtype, norms.get(part))
                self.a.append(a_parts)
                self.b.append(b_parts)
            head = base_model(model).lm_head  # its part comes after the layers' (RowAdapters.add(len(layers), "head"))
            a_parts, b_parts = {}, {}
            if isinstance(head, LoraLayer):
                a_parts["head"], b_parts["head"] = self._stack([head], dtype, _norm_factor(base_model(model).model.norm))
            self.a.append(a_parts)
            self.b.append(b_parts)

    def _stack(self, modules: list[nn.Module], dtype, norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A (adapters + 1, R, in) with the norm's weight in front folded in, and B (adapters + 1, out, R)."""
        outs = [_linear(m).out_features for m in modules]
        width = _linear(modules[0]).in_features
        ranks = [[m.adapters[n].r if isinstance(m, LoraLayer) and n in m.adapters else 0 for m in modules]
                 for n in self.names]
        rank = max(sum(r) for r in ranks) or 1
        device = _linear(modules[0]).weight.device
        a = torch.zeros(len(self.names) + 1, rank, width, device=device)
        b = torch.zeros(len(self.names) + 1, sum(outs), rank, device=device)
        for i, name in enumerate(self.names, start=1):
            r0, o0 = 0, 0
            for m, r, out in zip(modules, ranks[i - 1], outs):
                if r:
                    adapter = m.adapters[name]
                    a[i, r0:r0 + r] = adapter.lora_A.detach().float()
                    b[i, o0:o0 + out, r0:r0 + r] = adapter.lora_B.detach().float() * adapter.scaling
                r0, o0 = r0 + r, o0 + out
        if norm is not None:
            a = a * norm
        return a.to(dtype), b.to(dtype)

    def rows(self, adapters: list[str | None], device) -> "RowAdapters":
        """Each row's slice of the stack, gathered once for a batch's rows (in row order)."""
        index = torch.tensor([self.index[a] for a in adapters], device=device)
        return RowAdapters([{p: t.index_select(0, index).transpose(1, 2) for p, t in parts.items()} for parts in self.a],
                           [{p: t.index_select(0, index).transpose(1, 2) for p, t in parts.items()} for parts in self.b])


@dataclass
class RowAdapters:
    """Per layer and packed weight: A^T (rows, in, R) and B^T (rows, R, out) of each row's adapter."""

    a: list[dict[str, torch.Tensor]]
    b: list[dict[str, torch.Tensor]]

    def add(self, layer: int, part: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out + x A^T B^T`` row by row; x (rows, T, in), out (rows, T, out)."""
        a = self.a[layer].get(part)
        if a is None:
            return out
        return out.baddbmm(torch.bmm(x, a), self.b[layer][part])
