"""`PeftModel` and `get_peft_model`: adapters by name on a model we did not write.

The object layout is PEFT's (``PeftModel.base_model`` is a `LoraModel` whose ``.model`` is the
user's model), so parameter names such as
``base_model.model.model.layers.0.self_attn.q_proj.adapters.default.lora_A`` keep their meaning
and code that reaches for ``model.base_model.model`` keeps working.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import warnings

import torch
import torch.nn as nn

from lorakit import batching, io, plugins
from lorakit.config import LoraConfig
from lorakit.errors import ConfigError
from lorakit.inject import (
    ModulesToSave, count_parameters, inject_adapter, logical_modules, lora_layers,
    mark_trainable, replace_module,
)
from lorakit.layer import LoraLayer
from lorakit.plugins import method_for
from lorakit.signatures import ForwardingMethod

__all__ = ["LoraModel", "PeftModel", "get_peft_model"]


class LoraModel(nn.Module):
    """Holds the user's model with LoRA layers injected; forwards calls to it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}  # the PeftModel's dict, shared (PEFT's layout)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # -- the per-step hooks a training loop calls, whatever the method
    def auxiliary_loss(self) -> torch.Tensor | None:
        """A loss term the method adds to the task loss once per optimizer step (its gradient is
        accumulated before the step); None when there is none, as for LoRA."""
        return None

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (1-based), before the gradients are cleared; LoRA
        does nothing here (AdaLoRA reallocates its ranks)."""

    def check_new_adapter(self, config: LoraConfig) -> None:
        """Refuse an adapter of another kind than those already here: one model, one peft_type."""
        kinds = {c.peft_type for c in self.peft_config.values()}
        if kinds and config.peft_type not in kinds:
            raise ConfigError(f"this model holds {', '.join(sorted(kinds))} adapters; a {config.peft_type} "
                              "adapter needs a model of its own (use a fresh copy of the base model)")

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)


class PeftModel(nn.Module):
    """A model with named LoRA adapters. Build it with `get_peft_model` or `from_pretrained`."""

    def __init__(self, model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                 autocast_adapter_dtype: bool = True):
        super().__init__()
        self.base_model = _base_model_class(peft_config)(model)
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.peft_config: dict[str, LoraConfig] = self.base_model.peft_config
        self._active: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, peft_config)
        self.set_adapter(adapter_name)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    # -- passing through
    def _forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's forward. ``adapter_names`` (PEFT's argument): one adapter name per row of the
        batch, "__base__" for a row without an adapter; each row runs through its own adapter in
        this one pass (eval mode only; `lorakit.batching`)."""
        if adapter_names is None:
            return self.base_model(*args, **kwargs)
        with batching.mixed_batch(self, adapter_names, rows=batching.batch_size(args, kwargs)):
            return self.base_model(*args, **kwargs)

    forward = ForwardingMethod(_forward, lambda self: self.get_base_model().forward)
    """Seen by ``inspect.signature`` with the user's model's arguments (the Trainer keeps only the
    data columns a forward names), and ``adapter_names``."""

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The model's generate; ``adapter_names`` as in `forward` (one name per prompt; repeated
        for each beam or returned sequence), every step of the KV-cached loop per row."""
        model = self.get_base_model()
        if adapter_names is None:
            return model.generate(*args, **kwargs)
        with batching.mixed_batch(self, batching.names_for_generate(model, adapter_names, args, kwargs)):
            return model.generate(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The user's model (with the LoRA layers in it)."""
        return self.base_model.model

    # -- adapters by name
    @property
    def active_adapter(self) -> str:
        return self._active[0]

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    def add_adapter(self, adapter_name: str, peft_config: LoraConfig, low_cpu_mem_usage: bool = False) -> None:
        """Add a new adapter (not made active; `set_adapter` does that). It is trainable unless
        its config is in inference mode, as in PEFT."""
        io.check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ConfigError(f"an adapter named {adapter_name!r} already exists; pick another name "
                              "or delete_adapter() it first")
        if not isinstance(peft_config, LoraConfig):
            raise ConfigError(f"peft_config must be a lorakit LoraConfig, got {type(peft_config).__name__}")
        self.base_model.check_new_adapter(peft_config)
        model = self.get_base_model()
        from_base = plugins.base_weight_init(peft_config.init_lora_weights)
        if from_base is not None:
            from_base.check_targets(model, peft_config)  # before any base weight becomes a residual
        if self.peft_config and any(_mutates_base(c) for c in [peft_config, *self.peft_config.values()]):
            warnings.warn("an adapter initialised with PiSSA/OLoRA changed the base weights, so it should "
                          "not share the model with other adapters; convert it into a plain LoRA adapter "
                          "first (save_pretrained(..., path_initial_model_for_weight_conversion=...))",
                          stacklevel=2)
        trainable_before = {id(p) for p in model.parameters() if p.requires_grad}
        config = inject_adapter(model, copy.deepcopy(peft_config), adapter_name,
                                autocast_adapter_dtype=self.autocast_adapter_dtype)
        for module in model.modules():  # quantized base layers, wrapped or not (lorakit.plugins.QuantizedBase)
            kind = plugins.quantized_base(module)
            if kind is not None and kind.prepare is not None:
                kind.prepare(module)
        self.peft_config[adapter_name] = config
        mark_trainable(model, [adapter_name], config)
        for p in model.parameters():
            if id(p) in trainable_before:
                p.requires_grad_(True)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active (used in forward) and the only trainable ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown or not names:
            raise ConfigError(f"no adapter named {unknown or names}; adapters: {sorted(self.peft_config)}")
        self._active = names
        model = self.get_base_model()
        for _, module in logical_modules(model):
            if isinstance(module, LoraLayer):
                module.active_adapters = list(names)
            elif isinstance(module, ModulesToSave):
                module.active_adapter = next((n for n in names if n in module.modules_to_save), None)
        mark_trainable(model, names, self.peft_config[names[0]])

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ConfigError(f"no adapter named {adapter_name!r}; adapters: {sorted(self.peft_config)}")
        if len(self.peft_config) == 1:
            raise ConfigError(f"{adapter_name!r} is the only adapter; use unload() to remove LoRA entirely")
        for _, module in logical_modules(self.get_base_model()):
            if isinstance(module, LoraLayer) and adapter_name in module.adapters:
                module.delete_adapter(adapter_name)
            elif isinstance(module, ModulesToSave) and adapter_name in module.modules_to_save:
                del module.modules_to_save[adapter_name]
        del self.peft_config[adapter_name]
        remaining = [n for n in self._active if n != adapter_name] or [next(iter(self.peft_config))]
        self.set_adapter(remaining)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Inside the block the model is exactly the base model (merged adapters are unmerged
        for the duration and merged back after). After PiSSA/OLoRA that base is the residual
        model, not the original one (a warning says so)."""
        self._warn_residual("disable_adapter() gives", stacklevel=4)  # through contextlib
        layers = [m for _, m in logical_modules(self.get_base_model()) if isinstance(m, (LoraLayer, ModulesToSave))]
        merged = {id(m): list(m.merged_adapters) for m in layers if isinstance(m, LoraLayer) and m.merged}
        for m in layers:
            if id(m) in merged:
                m.unmerge()
            m.disable_adapters = True
        try:
            yield
        finally:
            for m in layers:
                m.disable_adapters = False
                if id(m) in merged:
                    m.merge(merged[id(m)])

    # -- adapter arithmetic
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: int | None = None,
                             svd_clamp: float | None = None, svd_full_matrices: bool = True,
                             svd_driver: str | None = None, density: float | None = None,
                             majority_sign_method: str = "total") -> None:
        """Add ``adapter_name``, a weighted combination of ``adapters`` ("cat": exactly
        sum_i w_i dW_i; "svd": its best rank-k approximation; "linear": the factors combined).
        PEFT's signature; the math and where it differs from PEFT are in
        `lorakit.variants.weighted`."""
        plugins.operation("add_weighted_adapter")(
            self, adapters, weights, adapter_name, combination_type=combination_type,
            svd_rank=svd_rank, svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices,
            svd_driver=svd_driver, density=density, majority_sign_method=majority_sign_method)

    # -- merging
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add the active (or named) adapters' updates into the base weights, in place."""
        for _, layer in lora_layers(self.get_base_model()):
            names = [n for n in (adapter_names or self._active) if n in layer.adapters]
            layer.merge(names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in lora_layers(self.get_base_model()):
            layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: list[str] | None = None) -> nn.Module:
        """Merge the adapters into the base weights and return the plain model."""
        return self._unload(merge=True, safe_merge=safe_merge, adapter_names=adapter_names)

    def unload(self) -> nn.Module:
        """Remove every LoRA layer without merging; returns the base model, which after PiSSA/OLoRA
        is the residual model ``W - scale * B0 A0``, not the original one (a warning says so)."""
        self._warn_residual("unload() returns", stacklevel=3)
        return self._unload(merge=False)

    def _warn_residual(self, what: str, stacklevel: int) -> None:
        mutated = sorted(n for n, c in self.peft_config.items() if _mutates_base(c))
        if mutated:
            warnings.warn(f"{what} the residual model, not the original: adapters {mutated} were initialised "
                          "with PiSSA/OLoRA, which replaced the base weights by W - scale * B0 A0; "
                          "merge_and_unload() gives the fine-tuned model, and the original weights come "
                          "from reloading the base model", stacklevel=stacklevel)

    def _unload(self, merge: bool, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        model = self.get_base_model()
        for name, module in list(logical_modules(model)):
            if isinstance(module, LoraLayer):
                if merge:
                    names = [n for n in (adapter_names or self._active) if n in module.adapters]
                    module.merge(names, safe_merge=safe_merge)
                elif module.merged:
                    module.unmerge()
                replace_module(model, name, module.base_layer)
            elif isinstance(module, ModulesToSave):
                keep = module.original_module
                if merge and module.active_adapter in module.modules_to_save:
                    keep = module.modules_to_save[module.active_adapter]
                replace_module(model, name, keep)
        return model

    # -- counting
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameters; "all" includes the adapters."""
        return count_parameters(self)

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")

    # -- files
    def save_pretrained(self, save_directory: str | os.PathLike, safe_serialization: bool = True,
                        selected_adapters: list[str] | None = None,
                        save_embedding_layers: bool | str = "auto", is_main_process: bool = True,
                        path_initial_model_for_weight_conversion: str | os.PathLike | None = None,
                        **kwargs) -> None:
        """Write each adapter in PEFT's layout: "default" in ``save_directory``, others in
        ``save_directory/<name>``. Weights are safetensors only.

        A PiSSA/OLoRA adapter saved as is loads correctly only onto the same original base model
        (loading re-runs the init there). ``path_initial_model_for_weight_conversion``: the
        directory of that adapter saved right after initialisation, before training; each
        adapter is then written as a plain LoRA adapter for the ORIGINAL base (rank 2r,
        ``init_lora_weights=True``, see `lorakit.variants.inits.convert_to_lora`), usable beside
        other adapters and in PEFT. Unlike PEFT, lorakit leaves that directory unchanged."""
        if not safe_serialization:
            raise ConfigError("safe_serialization=False would write a pickle; lorakit writes "
                              "safetensors only (drop the argument)")
        if kwargs:
            raise ConfigError(f"save_pretrained got unknown arguments {sorted(kwargs)}")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ConfigError(f"selected_adapters {unknown} do not exist; adapters: {sorted(self.peft_config)}")
        if not is_main_process:
            return
        model = self.get_base_model()
        base_name = getattr(getattr(model, "config", None), "name_or_path", None) or None
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            initial = io.read_adapter(path_initial_model_for_weight_conversion)[1]
        for name in names:
            config = self.peft_config[name]
            if config.base_model_name_or_path is None and base_name:
                config = dataclasses.replace(config, base_model_name_or_path=base_name)
            tensors = io.adapter_tensors(model, name, config, save_embedding_layers)
            if initial is not None:
                config, tensors = plugins.operation("convert_to_lora")(
                    config, tensors, initial, str(path_initial_model_for_weight_conversion))
            else:
                _warn_on_reload(config, f"adapter {name!r} was saved")
            io.save_adapter(io.adapter_subdir(save_directory, name), config, tensors,
                            base_precision=io.base_precision(model))

    @classmethod
    def from_pretrained(cls, model: nn.Module, model_id: str | os.PathLike, adapter_name: str = "default",
                        is_trainable: bool = False, config: LoraConfig | None = None,
                        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                        subfolder: str | None = None, **kwargs) -> "PeftModel":
        """Load an adapter directory onto ``model``. Frozen and in eval mode unless
        ``is_trainable=True``. An adapter saved with init "pissa*"/"olora" re-runs that init on
        ``model`` (making the residual) before its trained A, B are loaded, as PEFT does: pass
        the ORIGINAL base model, not a residual one."""
        if kwargs:
            raise ConfigError(f"from_pretrained got arguments lorakit does not support: {sorted(kwargs)} "
                              "(adapters load from a local directory)")
        directory = os.path.join(model_id, subfolder) if subfolder else model_id
        file_config, tensors = io.read_adapter(directory)
        config = dataclasses.replace(config or file_config, inference_mode=not is_trainable)
        io.check_shapes_before_injection(model, config, _shapes(tensors), directory)
        _warn_on_reload(config, f"{directory} is loaded")
        peft_model = cls(model, config, adapter_name, autocast_adapter_dtype)
        io.load_adapter_tensors(peft_model.get_base_model(), adapter_name,
                                peft_model.peft_config[adapter_name], tensors, directory)
        if not is_trainable:
            peft_model.eval()
        return peft_model

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, is_trainable: bool = False,
                     **kwargs) -> None:
        """Load another adapter directory under ``adapter_name`` (not made active)."""
        if kwargs:
            raise ConfigError(f"load_adapter got arguments lorakit does not support: {sorted(kwargs)}")
        file_config, tensors = io.read_adapter(model_id)
        io.check_shapes_before_injection(self.get_base_model(), file_config, _shapes(tensors), model_id)
        _warn_on_reload(file_config, f"{model_id} is loaded")
        self.add_adapter(adapter_name, dataclasses.replace(file_config, inference_mode=not is_trainable))
        io.load_adapter_tensors(self.get_base_model(), adapter_name, self.peft_config[adapter_name],
                                tensors, model_id)
        if not is_trainable:
            self.eval()


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(t.shape) for k, t in tensors.items()}


def _base_model_class(config: LoraConfig) -> type[LoraModel]:
    """PeftModel.base_model's class: the one the config's method registered (`lorakit.plugins.method_for`)."""
    if not isinstance(config, LoraConfig):
        raise ConfigError(f"peft_config must be a lorakit LoraConfig, got {type(config).__name__}")
    return method_for(config.peft_type).model_class


def _mutates_base(config: LoraConfig) -> bool:
    """Whether the adapter's init replaced the base weights by a residual (PiSSA, OLoRA)."""
    return plugins.base_weight_init(config.init_lora_weights) is not None


def _warn_on_reload(config: LoraConfig, event: str) -> None:
    from_base = plugins.base_weight_init(config.init_lora_weights)
    if from_base is not None:
        from_base.warn_on_reload(config.init_lora_weights, event)


def get_peft_model(model: nn.Module, peft_config: LoraConfig, adapter_name: str = "default",
                   mixed: bool = False, autocast_adapter_dtype: bool = True, revision: str | None = None,
                   low_cpu_mem_usage: bool = False) -> PeftModel:
    """Add a LoRA adapter to ``model`` (in place) and return it wrapped in a `PeftModel`.

    Every base parameter is frozen; the adapter's A and B (and what ``bias`` and
    ``modules_to_save`` ask for) are trainable."""
    if mixed:
        raise ConfigError("mixed=True (mixing adapter types) is not supported: lorakit is LoRA only")
    if isinstance(model, PeftModel):
        raise ConfigError("the model already has adapters; use model.add_adapter(name, config)")
    return PeftModel(model, peft_config, adapter_name, autocast_adapter_dtype)
