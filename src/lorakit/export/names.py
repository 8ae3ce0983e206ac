"""Where a transformers module's weight goes in a GGUF file, and the layout llama.cpp wants it in.

llama.cpp names tensors after its own scheme (``blk.<i>.attn_q.weight``, ``token_embd.weight``,
``output.weight``), which the ``gguf`` package's `gguf.TensorNameMap` maps from transformers'
module names for each architecture it knows. Llama-family checkpoints also store the rotary
dimensions of q and k in another order: transformers pairs dimension i with i + d/2 in each head,
llama.cpp pairs 2i with 2i+1, so llama.cpp's converter permutes the rows (output features) of
q_proj and k_proj, per head (`permute_rows`); transformers' GGUF loader undoes it on reading.
An adapter's update B A changes q_proj's rows through B, so B's rows are permuted the same way
and A is not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorakit.errors import CompatibilityError

__all__ = ["GGUF_ARCHITECTURES", "GgufNames", "gguf_names", "permute_rows"]

# transformers model_type -> the gguf package's architecture, for the architectures export supports
GGUF_ARCHITECTURES = {"llama": "LLAMA", "mistral": "LLAMA", "qwen2": "QWEN2", "qwen3": "QWEN3"}
# model types whose q/k rows llama.cpp's converter permutes (LlamaModel.permute in convert_hf_to_gguf.py)
_ROTARY_PERMUTED = {"llama", "mistral"}


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """The rows of a q_proj / k_proj weight (out, ...) in llama.cpp's rotary order: within each of the
    ``n_head`` heads, the two halves interleaved (``convert_hf_to_gguf.py``'s ``LlamaModel.permute``)."""
    out = weight.shape[0]
    if out % (2 * n_head):
        raise CompatibilityError(f"cannot permute {out} rows into {n_head} heads of rotary pairs")
    return (weight.reshape(n_head, 2, out // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


@dataclass(frozen=True)
class GgufNames:
    """The GGUF side of one model: its architecture name and how its modules map."""

    model_type: str
    arch: str
    """``general.architecture`` ("llama", "qwen2", ...)."""
    n_head: int
    n_head_kv: int
    _map: object

    def tensor(self, module: str) -> str:
        """``blk.0.attn_q`` for ``model.layers.0.self_attn.q_proj`` (no ``.weight`` suffix); a
        `CompatibilityError` for a module the architecture's GGUF has no tensor for."""
        name = self._map.get_name(module)
        if name is None:
            raise CompatibilityError(f"{module}: no tensor of a {self.arch} GGUF corresponds to this module; "
                                     "llama.cpp cannot load an update to it")
        return name

    def rows_permutation(self, module: str) -> int | None:
        """The head count whose rotary order ``module``'s output rows take in the GGUF, or None when
        they are stored as in transformers."""
        if self.model_type not in _ROTARY_PERMUTED:
            return None
        leaf = module.rsplit(".", 1)[-1]
        return {"q_proj": self.n_head, "k_proj": self.n_head_kv}.get(leaf)


def gguf_names(config) -> GgufNames:
    """The GGUF names of a transformers model of ``config`` (a `PretrainedConfig`)."""
    import gguf  # heavy: imported on first use

    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHITECTURES:
        raise CompatibilityError(f"exporting to GGUF supports {', '.join(sorted(GGUF_ARCHITECTURES))} models; this "
                                 f"base is {model_type!r}: merge the adapter (lorakit merge) and convert the merged "
                                 "model with llama.cpp's convert_hf_to_gguf.py")
    arch = getattr(gguf.MODEL_ARCH, GGUF_ARCHITECTURES[model_type])
    n_head = config.num_attention_heads
    return GgufNames(model_type=model_type, arch=gguf.MODEL_ARCH_NAMES[arch], n_head=n_head,
                     n_head_kv=getattr(config, "num_key_value_heads", None) or n_head,
                     _map=gguf.get_tensor_name_map(arch, config.num_hidden_layers))
