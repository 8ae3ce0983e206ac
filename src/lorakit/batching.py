"""Mixed-adapter batches: every row of a batch through its own adapter, in one forward pass.

    y[b] = base(x[b]) + s_k B_k A_k x[b],     k = the adapter of row b ("__base__": no update)

This is PEFT's ``adapter_names`` (one adapter name per row, "__base__" for a row without one),
the batching that multi-adapter servers do (Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023):

    model.eval()
    logits = model(input_ids, adapter_names=["sql", "__base__", "chat"]).logits
    out = model.generate(input_ids, attention_mask=mask, adapter_names=["sql", "__base__", "chat"])

    with mixed_batch(model, ["sql", "__base__", "chat"]):   # a decode loop of your own
        logits = model(input_ids, use_cache=True).logits     # every forward in the block uses
        ...                                                  # the per-row adapters, in row order

`mixed_batch(model, adapter_names)` is the interface: inside the block, every forward of
``model`` (a `PeftModel`, or the model inside it) runs row b of its batch through
``adapter_names[b]``; batch dimension first, as transformers' layers see it. It is eval mode only
(training with per-row adapters would need per-row gradients; PEFT refuses it too). The
adapters' weights are not copied into the base and nothing is merged. One block at a time per
model: the layers hold the rows' adapters while it is open (a server runs its batches from one
thread), and blocks nest (the inner one wins until it closes).

**The stack.** Each LoRA layer keeps its adapters stacked (``layer.adapter_stack``, a `Stack`:
slot 0 zeros for "__base__", slot k adapter k, padded to the layer's largest rank, the scale
folded into B), built once and reused by every forward until an adapter is added, deleted,
loaded or its weights change (tensor versions are checked on entering a block; `invalidate` drops
a model's stacks). The stack is a second copy of the adapters' weights; the adapters themselves
stay as they are (for set_adapter, training and saving). Each row's slot is its adapter's index
in the layer (0 where the layer does not hold that adapter: running the adapter alone does
nothing there). `LayerRows` applies it with `lorakit.kernels.batching`, whose docstring has the
math: the two ways (dense for few tokens x adapters, gather beyond), DoRA adapters (their rows
scaled by m / ||W + s B A||; PEFT refuses DoRA in mixed batches) and embedding layers.

Refused with a `ConfigError`: training mode, unknown names (the loaded ones are listed), a wrong
number of names, merged adapters (PEFT refuses too: unmerge first), AdaLoRA models, and adapters
that train whole modules (``modules_to_save``), which have no per-row form here.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Sequence

import torch
import torch.nn as nn

from lorakit.errors import ConfigError
from lorakit.inject import ModulesToSave, logical_modules
from lorakit.kernels import batching as kernel
from lorakit.layer import Adapter, LoraLayer
from lorakit.plugins import method_for
from lorakit.plugins import variant

__all__ = ["BASE", "mixed_batch", "invalidate", "batch_size", "names_for_generate"]

BASE = "__base__"  # PEFT's name for a row without an adapter

# --------------------------------------------------------------------------- the stack of one layer

def _no_stack() -> None:
    """What a pickled `Stack` loads as: no stack (the layer builds one on first use)."""
    return None


def _sources(layer: LoraLayer) -> tuple[list[torch.Tensor], tuple]:
    """The tensors a layer's stack is built from, and a stamp that changes when any of them does:
    names, scales and variants, the tensors' versions (an in-place write bumps it) and addresses
    (a new tensor, a move). Checked on every block entry, so kept to plain tuples."""
    tensors, kinds = [], []
    for name, a in layer.adapters.items():
        if a.variant is None:
            tensors += (a.lora_A, a.lora_B)
        else:  # DoRA's c depends on m and on the base weight too
            tensors += (a.lora_A, a.lora_B, a.lora_magnitude_vector, layer.base_layer.weight)
        kinds.append((name, a.scaling, a.variant))
    try:
        versions = tuple(t._version for t in tensors)
    except RuntimeError:  # an inference tensor keeps no version: never trust a cache of it
        versions = None
    return tensors, (tuple(kinds), versions, tuple(t.data_ptr() for t in tensors))


class Stack:
    """One layer's adapters stacked by slot (0 = no adapter), laid out as `lorakit.kernels.batching`
    takes them; see the module docstring."""

    def __init__(self, layer: LoraLayer):
        tensors, self.stamp = _sources(layer)
        self.refs = [weakref.ref(t) for t in tensors]
        self.names = list(layer.adapters)
        adapters = [layer.adapters[n] for n in self.names]
        self.slot = {name: k for k, name in enumerate(self.names, 1)}  # adapter name -> slot
        self.rank = max((a.lora_A.shape[0] for a in adapters), default=1)
        dtype = adapters[0].lora_A.dtype if adapters else layer.base_layer.weight.dtype
        for a in adapters[1:]:
            dtype = torch.promote_types(dtype, a.lora_A.dtype)
        device = layer.base_layer.weight.device
        n, r, n_in, n_out = len(adapters), self.rank, layer.in_features, layer.out_features
        embedding = layer.is_embedding
        with torch.no_grad():
            # A (n+1, R, in), or for an embedding A^T (n+1, vocab, R); Bt (n+1, R, out), scaled
            self.a = torch.zeros((n + 1, n_in, r) if embedding else (n + 1, r, n_in), dtype=dtype, device=device)
            self.bt = torch.zeros(n + 1, r, n_out, dtype=dtype, device=device)
            self.c_minus_1 = None  # DoRA: (n+1, out), c - 1 (0 for plain LoRA rows)
            for k, a in enumerate(adapters, 1):  # once per build, not per forward
                rank = a.lora_A.shape[0]
                if embedding:
                    self.a[k, :, :rank] = a.lora_A.T  # (vocab, r)
                else:
                    self.a[k, :rank] = a.lora_A  # (r, in)
                self.bt[k, :rank] = (a.lora_B * a.scaling).T  # (r, out)
                if a.variant is not None:
                    if self.c_minus_1 is None:
                        self.c_minus_1 = torch.zeros(n + 1, n_out, dtype=torch.float32, device=device)
                    c = variant(a.variant).row_scale(layer, a)  # (out,), fp32
                    self.c_minus_1[k] = c - 1
        self._casts: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {self.a.dtype: (self.a, self.bt)}
        self._rows: dict[tuple[int, ...], LayerRows] = {}

    def __deepcopy__(self, memo) -> "Stack":
        """A copy of the layer shares the stack (a cache of derived tensors) until it builds its own:
        `fresh` sees that the copy's adapters are other tensors."""
        return self

    def __reduce__(self):
        """A pickled layer carries no stack (its weak references do not pickle): built on first use."""
        return _no_stack, ()

    def fresh(self, layer: LoraLayer) -> bool:
        """Whether the layer's adapters are still exactly what the stack was built from."""
        tensors, stamp = _sources(layer)
        return (stamp == self.stamp and stamp[1] is not None and len(tensors) == len(self.refs)
                and all(ref() is t for ref, t in zip(self.refs, tensors)))

    def cast(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, Bt) in ``dtype`` (autocast's), cast once and kept."""
        if dtype not in self._casts:
            self._casts[dtype] = (self.a.to(dtype), self.bt.to(dtype))
        return self._casts[dtype]

    def rows(self, names: Sequence[str]) -> "LayerRows":
        """The layer's `LayerRows` for these per-row names, kept for the next batch like it."""
        slots = tuple(self.slot.get(n, 0) for n in names)  # 0: "__base__", or not an adapter of this layer
        if slots not in self._rows:
            if len(self._rows) >= 32:  # a server sees many compositions: keep the recent ones
                self._rows.pop(next(iter(self._rows)))
            self._rows[slots] = LayerRows(self, slots)
        return self._rows[slots]


def stack_of(layer: LoraLayer) -> Stack:
    """The layer's stack (kept on the layer, ``layer.adapter_stack``), rebuilt if any of its adapters
    changed since it was built."""
    stack = layer.adapter_stack
    if stack is None or not stack.fresh(layer):
        stack = layer.adapter_stack = Stack(layer)
    return stack


def invalidate(model: nn.Module) -> None:
    """Drop the stacks of ``model``'s layers; the next block rebuilds them. Not needed after
    lorakit's own operations or in-place writes (versions show those)."""
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.adapter_stack = None


# --------------------------------------------------------------------------- one layer, one batch

class LayerRows:
    """What one LoRA layer runs for the rows of a mixed batch (set as ``layer.row_adapters``);
    built once per layer and batch composition (`Stack.rows`), on the CPU, then moved."""

    def __init__(self, stack: Stack, slots: tuple[int, ...]):
        self.stack = stack
        self.n_rows = len(slots)
        self.base_only = not any(slots)
        device = stack.a.device
        self.slots = torch.tensor(slots, dtype=torch.long).to(device)  # (B,)
        used = sorted(set(slots) - {0})
        # the dense path's adapters: the stack's slots lo..hi (a view) unless that span is mostly unused
        span = list(range(used[0], used[-1] + 1)) if used else []
        self.cols = span if len(span) <= 2 * len(used) else used
        self.contiguous = self.cols == span
        position = torch.tensor([self.cols.index(s) if s else -1 for s in slots])  # (B,), -1: no adapter
        onehot = position[:, None] == torch.arange(len(self.cols))[None, :]  # (B, U)
        mask = onehot.repeat_interleave(stack.rank, dim=1)[:, None, :]  # (B, 1, U R)
        one_adapter = len(self.cols) == 1 and bool(onehot.all())
        self.mask = None if one_adapter else mask.to(device=device, dtype=stack.a.dtype)
        self.cols_index = torch.tensor(self.cols, dtype=torch.long).to(device)  # (U,)
        self._masks: dict[torch.dtype, torch.Tensor | None] = {}

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """[A_1; ..; A_U] (U R, in), [Bt_1; ..; Bt_U] (U R, out) and the row mask, in ``dtype``:
        views of the stack when the batch's slots are (mostly) one run, else copies for this call
        (kept nowhere: a server's many compositions would each hold their adapters twice)."""
        a, bt = self.stack.cast(dtype)
        if self.contiguous:
            a_u, bt_u = a[self.cols[0]:self.cols[-1] + 1], bt[self.cols[0]:self.cols[-1] + 1]  # (U, R, in), (U, R, out)
        else:
            a_u, bt_u = a.index_select(0, self.cols_index), bt.index_select(0, self.cols_index)
        if dtype not in self._masks:
            self._masks[dtype] = None if self.mask is None else self.mask.to(dtype)
        return a_u.reshape(-1, a.shape[-1]), bt_u.reshape(-1, bt.shape[-1]), self._masks[dtype]

    def rows_of(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """``t`` as (B, tokens, features), batch first; a wrong batch size is the caller's error."""
        if t.dim() < 2 or t.shape[0] != self.n_rows:
            raise ConfigError(
                f"adapter_names has {self.n_rows} names but the {what} has batch size "
                f"{t.shape[0] if t.dim() else 'none'}; give exactly one adapter name per row "
                f"({BASE!r} for a row without an adapter)")
        return t.reshape(self.n_rows, -1, t.shape[-1]) if t.dim() != 2 else t.unsqueeze(1)

    def forward(self, layer: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if layer.is_embedding:
            return self._embedding(layer, x, *args, **kwargs)
        result = layer.base_layer(x, *args, **kwargs)  # (..., out)
        if self.base_only or layer.disable_adapters:
            return result
        x3 = self.rows_of(x, "input")  # (B, T, in)
        dtype = _compute_dtype(x, self.stack)
        x3 = x3.to(dtype)
        y = self.rows_of(result, "output").to(dtype)  # (B, T, out): base(x)
        tokens = y.shape[1]
        if len(self.cols) == 1 or tokens * len(self.cols) <= kernel.DENSE_MAX:
            y = kernel.dense(y, x3, *self.dense(dtype))
        else:
            a, bt = self.stack.cast(dtype)
            y = kernel.gather(y, x3, a, bt, self.slots)
        if self.stack.c_minus_1 is not None:  # DoRA rows: + (c - 1) * (base(x) - bias + lora)
            y = kernel.dora(y, self.stack.c_minus_1, self.slots, layer.base_layer.bias)
        return y.to(result.dtype).view(result.shape)

    def _embedding(self, layer: LoraLayer, ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """``E[ids] + (A_k^T[ids] @ s_k B_k^T)`` per row: one lookup in the stacked (n+1) vocab table."""
        result = layer.base_layer(ids, *args, **kwargs)  # (..., dim)
        if self.base_only or layer.disable_adapters:
            return result
        ids2 = self.rows_of(ids.unsqueeze(-1), "input").squeeze(-1)  # (B, T)
        dtype = _compute_dtype(result, self.stack)
        a, bt = self.stack.cast(dtype)
        y = self.rows_of(result, "output").to(dtype)  # (B, T, dim): E[ids]
        y = kernel.embedding(y, ids2, a, bt, self.slots)  # (B, T, dim): + lora
        return y.to(result.dtype).view(result.shape)


def _compute_dtype(x: torch.Tensor, stack: Stack) -> torch.dtype:
    """Autocast's dtype under autocast, else the adapters' (as the single-adapter forward)."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else stack.a.dtype


# --------------------------------------------------------------------------- the block

def _check(model: nn.Module, adapter_names, layers: list[LoraLayer], wrappers: list[ModulesToSave]) -> list[str]:
    """The names as a list, or one ConfigError naming every problem and its fix."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        raise ConfigError(f"adapter_names must be a list with one adapter name per row of the batch, got "
                          f"{type(adapter_names).__name__} {adapter_names!r}; e.g. ['a', '{BASE}', 'b']")
    names = list(adapter_names)
    problems = []
    if not names:
        problems.append("adapter_names is empty; give one adapter name per row of the batch")
    bad = [n for n in names if not isinstance(n, str)]
    if bad:
        problems.append(f"adapter names must be strings, got {bad[:5]}")
    if model.training:
        problems.append("adapter_names works in eval mode only (per-row adapters are for inference, as in "
                        "PEFT); call model.eval() first, or train one adapter at a time with set_adapter()")
    config = getattr(model, "peft_config", None) or {}
    refused = sorted({method_for(c.peft_type).name for c in config.values()
                      if not method_for(c.peft_type).mixed_batches})
    if refused or any(not isinstance(a, Adapter) for layer in layers for a in layer.adapters.values()):
        problems.append(f"mixed adapter batches do not support {', '.join(refused) or 'these'} models (their "
                        "adapters have no per-row form); run each adapter alone with set_adapter(), or merge "
                        "it with merge_and_unload()")
    loaded = sorted(set(config) | {n for layer in layers for n in layer.adapters})
    unknown = sorted({n for n in names if isinstance(n, str) and n != BASE and n not in loaded})
    if unknown:
        problems.append(f"unknown adapter names {unknown}; loaded adapters: {loaded} "
                        f"(use {BASE!r} for a row without an adapter)")
    merged = sorted({n for layer in layers for n in layer.merged_adapters})
    if merged:
        problems.append(f"adapters {merged} are merged into the base weights, so every row would get them; "
                        "call model.unmerge_adapter() before using adapter_names")
    odd = sorted({a.variant for layer in layers for a in layer.adapters.values()
                  if isinstance(a, Adapter) and a.variant is not None and variant(a.variant).row_scale is None})
    if odd:
        problems.append(f"adapter variants {odd} have no mixed-batch forward; run them alone with set_adapter()")
    wanted = set(names) - {BASE}
    whole = sorted({n for m in wrappers for n in m.modules_to_save if n in wanted})
    if whole:
        problems.append(f"adapters {whole} train whole modules (modules_to_save), which have no per-row form "
                        "in lorakit's mixed batches; run them alone with set_adapter()")
    if problems:
        raise ConfigError("; ".join(problems))
    return names


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str], rows: int | None = None) -> Iterator[None]:
    """Inside the block, every forward of ``model`` runs row b of the batch through
    ``adapter_names[b]`` (``"__base__"``: the base model). ``model``: a `PeftModel` (or the model
    inside it) in eval mode. ``rows``: the batch size, when known, checked now (else at the first
    forward). See the module docstring for the math and what is refused."""
    found = [m for _, m in logical_modules(model)]  # LoRA layers and wrappers, not entered
    layers = [m for m in found if isinstance(m, LoraLayer)]
    wrappers = [m for m in found if isinstance(m, ModulesToSave)]
    names = _check(model, adapter_names, layers, wrappers)
    if rows is not None and rows != len(names):
        raise ConfigError(f"adapter_names has {len(names)} names but the batch has {rows} rows; give "
                          f"exactly one adapter name per row ({BASE!r} for a row without an adapter)")
    saved = [(layer, layer.row_adapters) for layer in layers]
    saved_wrappers = [(m, m.disable_adapters) for m in wrappers]
    try:
        for layer in layers:
            layer.row_adapters = stack_of(layer).rows(names)
        for m in wrappers:  # no row's adapter has a copy here (checked): every row uses the original
            m.disable_adapters = True
        yield
    finally:
        for layer, previous in saved:
            layer.row_adapters = previous
        for m, previous in saved_wrappers:
            m.disable_adapters = previous


# --------------------------------------------------------------------------- PeftModel's arguments

def batch_size(args: tuple, kwargs: dict) -> int | None:
    """The batch size of a forward's ``input_ids`` (or ``inputs_embeds``), if it has one."""
    for t in (kwargs.get("input_ids"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return t.shape[0]
    return None


def names_for_generate(model: nn.Module, adapter_names: Sequence[str], args: tuple, kwargs: dict) -> list[str]:
    """The per-row names as generate's forwards see them: each repeated once per beam (beam
    search) or per returned sequence (sampling), as transformers expands the rows."""
    if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)):
        return adapter_names  # mixed_batch reports it
    rows = None
    for t in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None, kwargs.get("inputs_embeds")):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            rows = t.shape[0]
            break
    if rows is not None and rows != len(adapter_names):
        raise ConfigError(f"adapter_names has {len(adapter_names)} names but the prompts have {rows} rows; give "
                          f"exactly one adapter name per prompt ({BASE!r} for a row without an adapter)")
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)

    def setting(key: str) -> int:
        value = kwargs.get(key, getattr(config, key, None))
        return int(value) if value else 1

    repeat = setting("num_beams") if setting("num_beams") > 1 else setting("num_return_sequences")
    return [n for n in adapter_names for _ in range(repeat)]
