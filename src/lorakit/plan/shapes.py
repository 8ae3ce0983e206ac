"""The shape of a model without its weights: what the planner counts, sizes and estimates from.

A `ModelShape` lists the adaptable modules of one transformer block (with their ``(in, out)``
shapes and full PyTorch module paths), the modules outside the blocks (the token embedding and
the output head), and the count of every other parameter (norms, position embeddings), so that
``total_params`` equals ``sum(p.numel() for p in model.parameters())`` of the real model.
Shapes come from a config.json, a GGUF header or the built-in catalog (see `sources`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator

__all__ = ["ModuleShape", "ModelShape"]


@dataclass(frozen=True)
class ModuleShape:
    """One adaptable module: a Linear, a GPT-2 style Conv1D, or an Embedding."""

    name: str  # path inside a block ("self_attn.q_proj") or inside the model ("lm_head")
    in_features: int  # for an Embedding: the number of embeddings (vocabulary)
    out_features: int  # for an Embedding: the embedding width
    bias: bool = False
    group: str = "attention"  # "attention", "mlp", "embedding" or "head"
    kind: str = "linear"  # "linear", "conv1d" or "embedding"
    roles: tuple[str, ...] = ()  # the Llama projections this module plays ("qkv_proj": q, k, v)

    @property
    def params(self) -> int:
        """Parameters of the frozen module: weight plus bias."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    def lora_params(self, r: int) -> int:
        """LoRA parameters at rank r: A is (r, in), B is (out, r)."""
        return r * (self.in_features + self.out_features)


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer, by shape: enough to count what LoRA adds and what training costs."""

    name: str
    model_type: str  # transformers' model_type ("llama", "qwen2", "gpt2", ...)
    source: str  # where the shape was read from (a file, or "built-in")
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    layers_prefix: str  # module path of the block list: "model.layers", "transformer.h"
    block: tuple[ModuleShape, ...]  # the adaptable modules of every block
    block_other_params: int  # other parameters of one block (norm weights and biases)
    embedding: ModuleShape  # full path, e.g. "model.embed_tokens"
    head: ModuleShape  # full path, e.g. "lm_head"; shares the embedding weight when tied
    other_params: int  # parameters outside blocks, embedding and head (final norm, positions)
    default_targets: tuple[str, ...]  # PEFT's default target_modules for this model_type
    max_positions: int | None = None
    # What a block keeps for backward beyond its shapes (see lorakit.plan.memory):
    mlp_saved: int = 3  # intermediate-sized tensors the MLP keeps (gated MLP: 3)
    norms_per_block: int = 2  # RMSNorms in a block (Gemma 2/3: 4)
    qk_norm: bool = False  # per-head norms of q and k (Qwen3, Gemma 3)
    attention_scores_bytes: int = 0  # per head and key, when attention materialises its scores
    extra: dict = field(default_factory=dict, compare=False)  # facts for display only

    # -- counts ---------------------------------------------------------------------------

    @property
    def block_params(self) -> int:
        return sum(m.params for m in self.block) + self.block_other_params

    @property
    def total_params(self) -> int:
        """All parameters of the base model, counting a tied head once (as PyTorch does)."""
        head = 0 if self.tie_word_embeddings else self.head.params
        return (self.num_layers * self.block_params + self.embedding.params + head
                + self.other_params)

    # -- module names ---------------------------------------------------------------------

    def modules(self) -> Iterator[tuple[str, ModuleShape]]:
        """Every adaptable module as (full module path, shape), in the model's order."""
        yield self.embedding.name, self.embedding
        for i in range(self.num_layers):
            for module in self.block:
                yield f"{self.layers_prefix}.{i}.{module.name}", module
        yield self.head.name, self.head

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a module path is in (``model.layers.3.mlp.up_proj`` -> 3), or None
        for a module outside the layers (the embedding, the head)."""
        prefix = self.layers_prefix + "."
        if not name.startswith(prefix):
            return None
        return int(name[len(prefix):].split(".", 1)[0])

    def target_names(self, roles: list[str] | tuple[str, ...]) -> list[str]:
        """target_modules entries for this model that cover the given Llama projection names.

        ``["q_proj", "v_proj"]`` is itself on a Llama; on Phi-3 it is ``["qkv_proj"]``, on GPT-2
        ``["c_attn"]``. An entry is a module's last name, or its path in the block where the last
        name is ambiguous (GPT-2 has ``attn.c_proj`` and ``mlp.c_proj``).
        """
        wanted = set(roles)
        leaf_count: dict[str, int] = {}
        for module in self.block:
            leaf = module.name.rsplit(".", 1)[-1]
            leaf_count[leaf] = leaf_count.get(leaf, 0) + 1
        names = []
        for module in self.block:
            if wanted & set(module.roles):
                leaf = module.name.rsplit(".", 1)[-1]
                names.append(leaf if leaf_count[leaf] == 1 else module.name)
        return names

    def describe(self) -> str:
        """One line a person can check against the model card."""
        kv = f"{self.num_kv_heads} KV, " if self.num_kv_heads != self.num_heads else ""
        tied = ", tied embeddings" if self.tie_word_embeddings else ""
        return (f"{self.model_type}: {self.num_layers} layers, hidden {self.hidden_size}, "
                f"MLP {self.intermediate_size}, {self.num_heads} heads ({kv}head_dim "
                f"{self.head_dim}), vocab {self.vocab_size:,}{tied}")

    def to_dict(self) -> dict:
        data = asdict(self)
        data["total_params"] = self.total_params
        return data
