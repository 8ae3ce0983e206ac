"""lorakit's training attention (`lorakit.kernels.attention`) as a transformers attention implementation.

`lorakit_attention` has transformers' attention-function signature and decides, per call, whether
the one-node kernel computes what the model asks for: self-attention over the whole sequence
(training and held-out loss), within the kernel's `MAX_SCORES` scores per layer. Decoding with a
cache, longer sequences, attention dropout and anything unusual go to transformers' sdpa.

A one-row batch of examples laid end to end (transformers' variable-length keywords
``cu_seq_lens_q``/``cu_seq_lens_k``, the trainer's packing) is attended to example by example,
after a shared prefix of ``lorakit_shared_prefix`` tokens if given, or each after the segment
that ``lorakit_segment_parents`` says it continues (a preference pair's prompt). The rows' layout is built once
per batch by the caller (`varlen_inputs`, which `model_inputs` calls) and reaches every layer as
the keyword ``lorakit_varlen_layout``, which transformers forwards from the model call to the
attention function as it does ``cu_seq_lens_q``; a caller that gives only the boundaries gets the
same result, with the layout built in every layer.

`use_lorakit_attention(model)` switches a loaded model over (Llama-family models only). Tests
compare it with sdpa on outputs and gradients, padded and packed (tests/models/test_attention.py).
"""

from __future__ import annotations

import torch

from lorakit.errors import DataError
from lorakit.kernels import attention as kernel
from lorakit.kernels.attention import varlen_layout
from lorakit.models.family import in_llama_family, unwrap

__all__ = ["ATTENTION", "LAYOUT_KEY", "PREFIX_KEY", "PARENTS_KEY", "lorakit_attention", "register", "use_lorakit_attention",
           "supports", "varlen_inputs"]

ATTENTION = "lorakit"
LAYOUT_KEY = "lorakit_varlen_layout"  # the attention keyword that carries a batch's `VarlenLayout`
PREFIX_KEY = "lorakit_shared_prefix"  # the attention keyword that carries the shared prefix's length
PARENTS_KEY = "lorakit_segment_parents"  # the segment each segment continues (a preference pair's prompt)


def varlen_inputs(cu_seq_lens: torch.Tensor, prefix: int = 0, parents: torch.Tensor | None = None) -> dict:
    """The model-call keywords of a one-row stream of examples: its boundaries as transformers'
    variable-length keywords, the shared prefix or the segments' parents, and the layout every
    layer's attention reads (built here, once per batch)."""
    inputs = {"cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
              LAYOUT_KEY: varlen_layout(cu_seq_lens, prefix, parents)}
    if prefix:
        inputs[PREFIX_KEY] = prefix
    if parents is not None:
        inputs[PARENTS_KEY] = parents
    return inputs


def _model_allows(module, kwargs) -> bool:
    """The model-side conditions of the kernel: causal, no softcap, bias or returned weights."""
    return (kwargs.get("softcap") is None and not kwargs.get("output_attentions")
            and kwargs.get("position_bias") is None and getattr(module, "is_causal", True))


@torch.compiler.disable
def lorakit_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature; returns ((B, S, H, D) output, None).

    It runs eagerly inside a torch.compile'd model (``compiler.disable``): its layout depends on
    the values of the example boundaries, which a compiled graph would bake in.

    With ``cu_seq_lens_q`` (the example boundaries of a one-row stream of examples,
    `PackingCollator(varlen=True)`) the examples are attended to one by one, in the layout
    ``lorakit_varlen_layout`` (`varlen_inputs`; built here when not given), after a shared prefix
    of ``lorakit_shared_prefix`` tokens if given. Otherwise ``attention_mask`` (which for packed
    rows transformers builds from ``position_ids``) keeps the examples apart."""
    cu = kwargs.pop("cu_seq_lens_q", None)
    cu_k = kwargs.pop("cu_seq_lens_k", cu)
    prefix = int(kwargs.pop(PREFIX_KEY, 0))
    parents = kwargs.pop(PARENTS_KEY, None)
    layout = kwargs.pop(LAYOUT_KEY, None)
    if cu is not None:
        if layout is None:  # a caller that gave only the boundaries (varlen_inputs gives both)
            layout = varlen_layout(cu, prefix, parents)
        if not (query.shape[0] == 1 and (cu_k is cu or torch.equal(cu_k, cu)) and query.shape[2] == key.shape[2]
                and query.shape[2] == len(layout.inverse)):  # the boundaries cover the row
            raise DataError(f"cu_seq_lens_q must describe the whole one-row batch (q {tuple(query.shape)}, "
                            f"k {tuple(key.shape)}); got {cu.tolist()} with a shared prefix of {prefix}")
        if _model_allows(module, kwargs) and kernel.usable(query, key, value, None, dropout,
                                                            scores=layout.scores(query.shape[1])):
            return kernel.attend_varlen(query, key, value, layout, scaling), None
        attention_mask = kernel.stream_mask(cu, prefix, parents)  # the mask transformers built knows no shared prefix
    if not (_model_allows(module, kwargs) and kernel.usable(query, key, value, attention_mask, dropout)):
        # transformers on first use: importing lorakit.data (which names ATTENTION) must stay light
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    return kernel.attend(query, key, value, attention_mask, scaling), None


def register() -> None:
    """Make "lorakit" an attention implementation transformers knows (idempotent)."""
    # transformers on first use, as above
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, lorakit_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def supports(model) -> bool:
    config = getattr(unwrap(model), "config", None)
    return (in_llama_family(model)
            and getattr(config, "_attn_implementation", None) in ("sdpa", "eager", ATTENTION)
            and not getattr(config, "sliding_window", None))


def use_lorakit_attention(model) -> bool:
    """Switch ``model`` (a transformers model) to lorakit's attention where supported; returns whether it did."""
    if not supports(model):
        return False
    register()
    unwrap(model).config._attn_implementation = ATTENTION
    return True
