"""LoRA layers: a frozen base layer plus named low-rank adapters.

    y = base(x) + sum over active adapters of  scale * B (A (dropout(x)))        (Hu et al. 2021)

with A (r x in), B (out x r) and scale = alpha / r, or alpha / sqrt(r) with rsLoRA
(Kalajdzievski 2023). `LoraLinear` wraps `nn.Linear` and GPT-2's `Conv1D` (a linear layer whose
weight is stored (in, out): ``fan_in_fan_out``) and a quantized linear layer (bitsandbytes 4-bit or 8-bit, read
and written through its `lorakit.plugins.QuantizedBase`); `LoraEmbedding` wraps `nn.Embedding`,
where A acts as a lookup table. Each layer owns ``adapters: dict[name, Adapter]``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit import plugins
from lorakit.errors import LorakitError
from lorakit.kernels import fused

__all__ = ["Adapter", "LoraLayer", "LoraLinear", "LoraEmbedding", "is_conv1d", "supported_layer"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 `Conv1D`: ``y = x @ W + b`` with W (in, out). Found by name so that the
    core does not import transformers."""
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def supported_layer(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Embedding)) or is_conv1d(module)


class Adapter(nn.Module):
    """One adapter on one layer: its A, B, scale, dropout and optional DoRA magnitude.

    Parameter names are the ecosystem's: ``lora_A`` (r x in) and ``lora_B`` (out x r). For an
    embedding, "in" is the vocabulary size and "out" the embedding width.
    """

    def __init__(self, in_features: int, out_features: int, *, r: int, lora_alpha: float,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init=True,
                 embedding: bool = False, dtype=None, device=None):
        super().__init__()
        self.r = r
        self.lora_alpha = lora_alpha
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        # DoRA's magnitude m (out,), set by `lorakit.variants.dora.add_magnitude`, with variant "dora"
        self.register_parameter("lora_magnitude_vector", None)
        # the adapter's variant, by name (its rule: `lorakit.plugins.variant`); None: plain LoRA
        self.variant: str | None = None
        # tensors the variant derives and keeps between calls, by name (DoRA: the base weight's
        # row norms, the norm used at merge); never saved
        self.variant_cache: dict[str, Any] = {}
        self.reset_parameters(init, embedding)

    def reset_parameters(self, init, embedding: bool) -> None:
        """PEFT's initialisations, so that the same seed gives the same weights."""
        with torch.no_grad():
            if init is False:
                # Random A and B (a non-zero update): PEFT keeps the layers' own default init.
                if embedding:
                    self.lora_A.normal_()
                    self.lora_B.normal_()
                else:
                    nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                    nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            elif embedding:  # the embedding's own init rule, as loralib and PEFT do
                nn.init.zeros_(self.lora_A)
                nn.init.normal_(self.lora_B)
            else:
                if init is True:
                    nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
                else:  # "gaussian"
                    nn.init.normal_(self.lora_A, std=1 / self.r)
                nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The update ``scale * B @ A``, shape (out, in), computed in at least fp32."""
        a, b = self.lora_A, self.lora_B
        if a.dtype in (torch.float16, torch.bfloat16):
            a, b = a.float(), b.float()
        return (b @ a) * self.scaling  # (out, in)

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}"


class LoraLayer(nn.Module):
    """What every LoRA layer shares: the base layer, its adapters, which are active and merged."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        # inside `lorakit.batching.mixed_batch`: each row's adapter (a LayerRows), else None
        self.row_adapters = None
        # the adapters stacked for mixed batches (a `lorakit.batching.Stack`), built on first use
        self.adapter_stack = None
        # take the fused path where it applies (`lorakit.kernels.fused`); False: the reference forward
        self.use_fused = True
        # the base weight with every merged adapter taken out, held while a variant's merge rule
        # replays the merges (`lorakit.variants.dora`), else None
        self.held_unmerged_weight: torch.Tensor | None = None

    # -- the per-kind pieces
    @property
    def quantized(self) -> plugins.QuantizedBase | None:
        """How to read and write a quantized base layer's weight (`lorakit.plugins`); None: a plain tensor."""
        return plugins.quantized_base(self.base_layer)

    @property
    def in_features(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define in_features")

    @property
    def out_features(self) -> int:
        raise NotImplementedError(f"{type(self).__name__} must define out_features")

    is_embedding = False

    def delta_in_weight_layout(self, name: str) -> torch.Tensor:
        """The adapter's update in the base weight's own layout."""
        return self.adapters[name].delta_weight()

    def base_weight(self) -> torch.Tensor:
        """The base weight as the layer computes with it, in its own layout: the weight's data, or a
        quantized layer's weight dequantized (fp32)."""
        if self.quantized is not None:
            return self.quantized.dequantize(self.base_layer)
        return self.base_layer.weight.data

    def set_base_weight(self, value: torch.Tensor) -> None:
        """Store ``value`` (the weight's layout) as the base weight: in place, in the weight's dtype
        (an in-place write bumps the weight's version, which caches watch), or quantized again."""
        if self.quantized is not None:
            self.quantized.requantize(self.base_layer, value)
            return
        weight = self.base_layer.weight
        with torch.no_grad():
            weight.copy_(value.to(weight.dtype))

    # -- adapters
    def add_adapter(self, name: str, *, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init=True, autocast_fp32: bool = True) -> Adapter:
        weight = self.base_layer.weight
        dtype = weight.dtype
        if (autocast_fp32 and dtype in (torch.float16, torch.bfloat16)) or not dtype.is_floating_point:
            dtype = torch.float32  # adapters train in fp32 over a half-precision base, as PEFT
        adapter = Adapter(
            self.in_features, self.out_features, r=r, lora_alpha=lora_alpha,
            lora_dropout=0.0 if self.is_embedding else lora_dropout, use_rslora=use_rslora,
            init=init, embedding=self.is_embedding, dtype=dtype, device=weight.device,
        )
        from_base = plugins.base_weight_init(init)
        if from_base is not None:  # PiSSA, OLoRA: A, B from W, and W <- W - scale * B A
            from_base.init_from_base(self, adapter, init)
        self.adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _adapters_for_forward(self) -> list[Adapter]:
        if self.disable_adapters or self.merged:
            return []
        return [self.adapters[n] for n in self.active_adapters if n in self.adapters]

    # -- merging: W <- W + scale * B A, in place
    def merge(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = self.active_adapters if adapter_names is None else adapter_names
        for name in names:
            if name in self.merged_adapters:
                warnings.warn(f"adapter {name!r} is already merged; skipping", stacklevel=2)
                continue
            variant = self.adapters[name].variant
            if variant is not None:  # its own rule (DoRA: W' = m / ||W + s B A|| * (W + s B A))
                merged = plugins.variant(variant).merged_weight(self, name)
            else:
                weight = self.base_weight()
                delta = self.delta_in_weight_layout(name)
                merged = weight.float() + delta if weight.dtype != torch.float32 else weight + delta
            if safe_merge and not torch.isfinite(merged).all():
                raise LorakitError(
                    f"merging adapter {name!r} gives non-finite weights; the adapter is broken "
                    "(check its values with `lorakit inspect`)"
                )
            self.set_base_weight(merged)
            self.merged_adapters.append(name)

    def unmerge(self, adapter_names: list[str] | None = None) -> None:
        names = list(reversed(self.merged_adapters if adapter_names is None else adapter_names))
        for name in names:
            if name not in self.merged_adapters:
                continue
            variant = self.adapters[name].variant
            if variant is not None:
                restored = plugins.variant(variant).unmerged_weight(self, name)
            else:
                weight = self.base_weight()
                delta = self.delta_in_weight_layout(name)
                restored = weight.float() - delta if weight.dtype != torch.float32 else weight - delta
            self.set_base_weight(restored)
            self.merged_adapters.remove(name)


class LoraLinear(LoraLayer):
    """LoRA around `nn.Linear` or GPT-2's `Conv1D` (``fan_in_fan_out``: weight stored (in, out))."""

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False):
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out

    @property
    def in_features(self) -> int:
        if self.quantized is not None:  # the weight's shape is the packed storage's
            return self.base_layer.in_features
        w = self.base_layer.weight
        return w.shape[0] if self.fan_in_fan_out else w.shape[1]

    @property
    def out_features(self) -> int:
        if self.quantized is not None:
            return self.base_layer.out_features
        w = self.base_layer.weight
        return w.shape[1] if self.fan_in_fan_out else w.shape[0]

    def delta_in_weight_layout(self, name: str) -> torch.Tensor:
        delta = self.adapters[name].delta_weight()  # (out, in)
        return delta.T if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``base(x) + scale * B(A(dropout(x)))`` summed over the active adapters.

        One adapter on an `nn.Linear` takes the fused path (`lorakit.kernels.fused`): the same sum as
        one autograd node. The loop below is the reference, and the path for everything else.
        An adapter with a variant (DoRA) runs its variant's own forward, fused or reference.
        """
        if self.row_adapters is not None:  # a mixed batch: row b through its own adapter (lorakit.batching)
            return self.row_adapters.forward(self, x, *args, **kwargs)
        adapters = self._adapters_for_forward()
        if len(adapters) == 1 and self.use_fused and not args and not kwargs and not self.fan_in_fan_out \
                and type(self.base_layer) is nn.Linear:
            a = adapters[0]
            dtype = fused.compute_dtype(x, self.base_layer.weight, a.lora_A)
            if dtype is not None and a.variant is None:
                return fused.lora_linear(x, self.base_layer, a.lora_A, a.lora_B, a.scaling, a.lora_dropout, dtype)
            if dtype is not None:
                out = plugins.variant(a.variant).fused_forward(self, a, x, dtype)
                if out is not None:
                    return out
        result = self.base_layer(x, *args, **kwargs)  # (..., out)
        if not adapters:
            return result
        if self.quantized is not None:
            return self._add_to_quantized(x, result, adapters)
        out_dtype = result.dtype
        for a in adapters:
            if a.variant is not None:  # the variant's reference forward (lorakit.plugins)
                result = plugins.variant(a.variant).forward(self, a, x, result)  # (..., out)
                continue
            h = a.lora_dropout(x.to(a.lora_A.dtype))  # (..., in)
            result = result + F.linear(F.linear(h, a.lora_A), a.lora_B) * a.scaling  # (..., out)
        return result.to(out_dtype)

    def _add_to_quantized(self, x: torch.Tensor, result: torch.Tensor, adapters: list[Adapter]) -> torch.Tensor:
        """The adapters' outputs added to a quantized layer's, in PEFT's order for these layers (each
        output cast to the layer's output dtype, then added; under autocast, autocast's dtypes), so
        that an adapter gives PEFT's outputs to the last bit."""
        cast = not torch.is_autocast_enabled(x.device.type)
        for a in adapters:
            h = a.lora_dropout(x.to(a.lora_A.dtype) if cast else x)  # (..., in)
            out = F.linear(F.linear(h, a.lora_A), a.lora_B) * a.scaling  # (..., out)
            result = result + (out.to(result.dtype) if cast else out)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around `nn.Embedding`: A (r x vocab) is looked up like an embedding table.

        y = E[ids] + scale * (A.T[ids] @ B.T)
    """

    is_embedding = True

    @property
    def in_features(self) -> int:
        return self.base_layer.num_embeddings

    @property
    def out_features(self) -> int:
        return self.base_layer.embedding_dim

    def delta_in_weight_layout(self, name: str) -> torch.Tensor:
        return self.adapters[name].delta_weight().T  # (vocab, dim), the table's layout

    def forward(self, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.row_adapters is not None:  # a mixed batch: row b through its own adapter (lorakit.batching)
            return self.row_adapters.forward(self, ids, *args, **kwargs)
        result = self.base_layer(ids, *args, **kwargs)  # (..., dim)
        adapters = self._adapters_for_forward()
        if not adapters:
            return result
        base = self.base_layer
        out_dtype = result.dtype
        for a in adapters:
            after_a = F.embedding(ids, a.lora_A.T, base.padding_idx, base.max_norm,
                                  base.norm_type, base.scale_grad_by_freq, base.sparse)  # (..., r)
            result = result + (after_a @ a.lora_B.T) * a.scaling  # (..., dim)
        return result.to(out_dtype)


def make_lora_layer(module: nn.Module, fan_in_fan_out: bool) -> LoraLayer:
    """Wrap a supported layer in its LoRA layer (no adapters yet)."""
    if isinstance(module, nn.Embedding):
        return LoraEmbedding(module)
    if is_conv1d(module):
        return LoraLinear(module, fan_in_fan_out=True)
    return LoraLinear(module, fan_in_fan_out=fan_in_fan_out)
