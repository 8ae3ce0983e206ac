"""A decoder built for generation speed: a Llama-family model's forward, hand-fused, over a static KV cache.

transformers' forward spends a small model's decode step on Python and per-operator overhead
(modules, hooks, masks, a cache that grows by concatenation). This decoder runs the same
arithmetic with about 20 operators per layer:

    h      = embed[ids]                                     (rows, T, hidden), fp32
    a      = rms_norm(h) -> dtype;  qkv = a @ Wqkv^T (+ LoRA rows)
    q, k   = rope(q), rope(k) at each row's positions;  v
    cache[slot, :, pos] = k, v                              a preallocated (slots, kv heads, capacity, head dim)
    h     += sdpa(q, cache[:, :, :len]) @ Wo^T              grouped-query attention, masked by each row's length
    h     += (silu(gate) * up)(rms_norm(h) @ Wgate_up^T) @ Wdown^T
    logits = rms_norm(h[last]) @ Whead^T

- **Rows are slots**: row i of a step is slot i of the cache. `Decoder.prefill_many` writes new
  rows' prompts into their slots together, in chunks of at most ``chunk`` tokens a row (the same
  kernels; attention within a chunk is causal, every chunk sees the slot's earlier tokens; a
  shorter row's chunk is padded, and the padding's keys go to a scratch position that attention
  never reads); `Decoder.step` advances every live slot by one token; `Decoder.move` copies a slot
  to another (the engine keeps its live rows in slots 0..n-1, so a step reads ``cache[:n]``
  without gathering).
- **Weights** (`lorakit.generation.weights`): frozen, packed, in ``dtype`` (bf16 where the machine
  multiplies bf16 natively: half the bytes read per token). When every live row uses one adapter,
  that adapter is merged into a packed copy (the model's weights are never written, so switching
  is exact); rows with different adapters run the base weights plus each row's adapter from an
  `AdapterStack` (two batched products per packed weight).
- **Prefix cache** (`lorakit.generation.prefix`): a prompt's keys and values are kept (up to
  ``prefix_cache_bytes``) by adapter and tokens; a later prompt that starts with the same tokens
  (the same system prompt, a chat's earlier turns) copies them and prefills only the rest.
  Among prompts prefilled together, one that shares a longer start with an earlier one than the
  cache holds waits for that one, then copies it.

Residuals, norms and the logits are fp32; in bf16 the products, attention and the cache are bf16.
In fp32 the decoder gives the model's own logits to rounding (tests/generation/test_decoder.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.errors import ConfigError
from lorakit.kernels.precision import native_bf16
from lorakit.generation.prefix import PrefixCache, common_start
from lorakit.generation.weights import AdapterStack, Packed, RowAdapters, base_model, pack, unsupported

__all__ = ["Decoder", "unsupported", "decode_dtype", "autocast_dtype"]

_WORTH_WAITING = 16
"""Tokens: among prompts prefilled together, a shorter start shared with an earlier one than this
(beyond what the prefix cache holds) is computed again rather than waited for."""


def decode_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 where the hardware multiplies bf16 natively (`lorakit.kernels.precision`), else fp32."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def autocast_dtype(autocast, device: torch.device | str) -> torch.dtype:
    """The dtype that ``autocast`` (a callable giving a context manager, or None) computes in on
    ``device``: the decoder's dtype for callers that ask for precision by autocast (fp32 without one)."""
    if autocast is None:
        return torch.float32
    kind = torch.device(device).type
    with autocast():
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


class Decoder:
    """See the module docstring. ``slots``: rows at most; ``capacity``: tokens per row to allocate
    for at first (the cache grows as rows need, up to the model's ``max_position_embeddings``)."""

    def __init__(self, model, *, slots: int = 16, capacity: int = 1024, dtype: torch.dtype | None = None,
                 chunk: int = 256, prefill_tokens: int = 2048, prefix_cache_bytes: int = 256 << 20,
                 merge: bool = True):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the fast decoder does not run this model: {reason}")
        self.model = model
        base = base_model(model)
        config = base.config
        self.device = base.model.embed_tokens.weight.device
        self.dtype = dtype or decode_dtype(self.device)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden = config.hidden_size
        self.eps = config.rms_norm_eps
        self._eps_sum = torch.tensor(self.hidden * self.eps, device=self.device)
        self._flash_cpu = self.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
        self.embed = base.model.embed_tokens.weight  # looked up, never copied
        self.slots, self.chunk = slots, chunk
        self.prefill_tokens = max(prefill_tokens, chunk)  # positions (rows x chunk) in one prefill forward at most
        self.merge = merge  # one adapter for every row: merged into the weights (False: run as A and B products)
        self.max_positions = getattr(config, "max_position_embeddings", None) or capacity
        self.capacity = min(capacity, self.max_positions)
        self._layers = len(base.model.layers)
        self.keys = self.values = torch.empty(0)
        self._allocate(self.capacity)
        self.lengths = [0] * slots  # tokens in each slot's cache
        self._packed: dict[str | None, Packed] = {}  # None: the base weights; else one merged adapter
        self._stack: AdapterStack | None = None
        self._rows: tuple[tuple, RowAdapters] | None = None  # the row adapters gathered for a batch's rows
        self.prefixes = PrefixCache(prefix_cache_bytes)

    @torch.inference_mode()
    def reserve(self, length: int) -> None:
        """Make room for rows of ``length`` tokens: the cache grows (to twice its size, or to
        ``length``) up to the model's ``max_position_embeddings``."""
        if length <= self.capacity:
            return
        if length > self.max_positions:
            raise ConfigError(f"a prompt and its new tokens need {length} positions; the model takes "
                              f"{self.max_positions} (max_position_embeddings): shorten the prompt or lower "
                              "max_tokens")
        self._allocate(min(max(length, 2 * self.capacity), self.max_positions))

    def _allocate(self, capacity: int) -> None:
        """The cache (layers, slots, kv heads, capacity + 1, head_dim), keeping what it holds (the
        last position is scratch: a padded chunk's padding is written there and never read), and
        cos and sin for every position (capacity, head_dim) from the model's own rotary embedding
        (so its scaling rules apply)."""
        shape = (self._layers, self.slots, self.kv_heads, capacity + 1, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype, device=self.device)
        values = torch.zeros(shape, dtype=self.dtype, device=self.device)
        held = self.capacity if self.keys.dim() == 5 else 0
        if held:
            keys[:, :, :, :held] = self.keys[:, :, :, :held]
            values[:, :, :, :held] = self.values[:, :, :, :held]
        self.keys, self.values, self.capacity = keys, values, capacity
        positions = torch.arange(capacity, device=self.device).unsqueeze(0)
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = base_model(self.model).model.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        half = self.head_dim // 2
        self._rotate_sign = torch.cat([-torch.ones(half), torch.ones(self.head_dim - half)]).to(self.device, self.dtype)

    # -- weights
    def weights(self, adapters: list[str | None]) -> tuple[Packed, RowAdapters | None]:
        """The packed weights for rows using ``adapters`` (None: the base model), and the rows'
        adapters when they differ (else None: merged, or the base model)."""
        names = set(adapters)
        if len(names) == 1 and (self.merge or None in names):
            name = next(iter(names))
            if name not in self._packed:
                for key in [k for k in self._packed if k is not None]:  # one merged copy at a time
                    del self._packed[key]
                self._packed[name] = pack(self.model, self.dtype, merged=name)
            return self._packed[name], None
        if None not in self._packed:
            self._packed[None] = pack(self.model, self.dtype)
        if self._stack is None:
            self._stack = AdapterStack(self.model, self.dtype)
        key = tuple(adapters)
        if self._rows is None or self._rows[0] != key:
            self._rows = (key, self._stack.rows(list(adapters), self.device))
        return self._packed[None], self._rows[1]

    # -- the forward
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, slots: list[int], starts: list[int], weights: Packed,
                rows: RowAdapters | None, last_only: bool = True, counts: list[int] | None = None) -> torch.Tensor:
        """Row i of ``ids`` (n, T) is slot ``slots[i]`` and takes its first ``counts[i]`` tokens
        (default all T; the rest is padding) at positions ``starts[i]`` on; their keys and values
        are written to the cache and the logits returned, fp32: (n, V) of each row's last token
        (``last_only``), else (n, T, V)."""
        n, t = ids.shape
        heads, kvh, hd = self.heads, self.kv_heads, self.head_dim
        group = heads // kvh
        counts = counts or [t] * n
        padded = min(counts) < t
        length = max(s + c for s, c in zip(starts, counts))
        self.reserve(length)
        start = torch.tensor(starts, device=self.device)
        positions = start.unsqueeze(1) + torch.arange(t, device=self.device)  # (n, T)
        if padded:
            real = torch.arange(t, device=self.device) < torch.tensor(counts, device=self.device).unsqueeze(1)
            positions = torch.where(real, positions, self.capacity)  # padding: the scratch position
        rope = positions.clamp(max=self.capacity - 1) if padded else positions
        cos, sin = self.cos[rope].unsqueeze(2), self.sin[rope].unsqueeze(2)  # (n, T, 1, hd)
        mask = None if t == 1 and all(s == length - 1 for s in starts) else self._mask(start, t, length, group)
        slot0 = slots[0]
        consecutive = list(slots) == list(range(slot0, slot0 + n))  # read as a slice, else gathered
        slot_index = torch.tensor(slots, device=self.device)
        # where each row's new keys go in a layer's cache seen as (slots * kvh * (capacity + 1), hd), in k's order (n, T, kvh)
        head_index = torch.arange(kvh, device=self.device).view(1, 1, kvh)
        write = ((slot_index.view(n, 1, 1) * kvh + head_index) * (self.capacity + 1) + positions.unsqueeze(2)).view(-1)
        h = F.embedding(ids, self.embed).float()  # (n, T, hidden)
        half = hd // 2
        sin = sin * self._rotate_sign  # rotate_half(x) = roll(x, half) with the first half negated
        for index, w in enumerate(weights.layers):
            a = self._normalized(h)  # the norm's weight is folded into the next products' weights
            qkv = w.qkv(a)  # (n, T, (heads + 2 kvh) hd)
            if rows is not None:
                qkv = rows.add(index, "qkv", a, qkv)
            qkv = qkv.view(n, t, heads + 2 * kvh, hd)
            qk = qkv[:, :, :heads + kvh]
            qk = torch.addcmul(qk * cos, qk.roll(half, -1), sin)  # rope: q cos + rotate_half(q) sin
            keys, values = self.keys[index], self.values[index]
            keys.view(-1, hd).index_copy_(0, write, qk[:, :, heads:].reshape(-1, hd))
            values.view(-1, hd).index_copy_(0, write, qkv[:, :, heads + kvh:].reshape(-1, hd))
            if consecutive:
                k, v = keys[slot0:slot0 + n, :, :length], values[slot0:slot0 + n, :, :length]  # (n, kvh, length, hd)
            else:
                k, v = keys[:, :, :length].index_select(0, slot_index), values[:, :, :length].index_select(0, slot_index)
            # the query heads that share a key head are that head's queries: (n, kvh, group * T, hd)
            q = qk[:, :, :heads]
            q = q.view(n, kvh, group, hd) if t == 1 else \
                q.reshape(n, t, kvh, group, hd).permute(0, 2, 3, 1, 4).reshape(n, kvh, group * t, hd)
            attn = self._attention(q, k, v, mask)
            o = attn.reshape(n, 1, heads * hd) if t == 1 else \
                attn.view(n, kvh, group, t, hd).permute(0, 3, 1, 2, 4).reshape(n, t, heads * hd)
            out = w.o(o)
            if rows is not None:
                out = rows.add(index, "o", o, out)
            h += out
            a = self._normalized(h)
            gate_up = w.gate_up(a)
            if rows is not None:
                gate_up = rows.add(index, "gate_up", a, gate_up)
            gate, up = gate_up.chunk(2, dim=-1)
            m = F.silu(gate).mul_(up)
            out = w.down(m)
            if rows is not None:
                out = rows.add(index, "down", m, out)
            h += out
        if last_only:
            h = h[torch.arange(n, device=self.device), torch.tensor(counts, device=self.device) - 1] if padded else h[:, -1]
        h = self._normalized(h)
        logits = weights.head(h)
        if rows is not None:
            flat = h.unsqueeze(1) if last_only else h
            logits = rows.add(len(weights.layers), "head", flat, logits.unsqueeze(1) if last_only else logits)
            logits = logits.squeeze(1) if last_only else logits
        return logits.float()

    def _normalized(self, h: torch.Tensor) -> torch.Tensor:
        """RMSNorm without its weight, in the decoder's dtype: ``h / sqrt(mean(h^2) + eps)`` is
        ``sqrt(d) * h / sqrt(|h|^2 + d eps)``, and the weight and ``sqrt(d)`` are folded into the
        weights of the products after it (`lorakit.generation.weights`)."""
        norm = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
        scale = torch.addcmul(self._eps_sum, norm, norm).rsqrt_()
        return torch.mul(h, scale, out=torch.empty(h.shape, dtype=self.dtype, device=h.device))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d)) v``: PyTorch's CPU flash-attention kernel called directly where
        there is one (the dispatcher's choice of kernel costs more than the kernel for one token)."""
        if self._flash_cpu and mask is None:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def _mask(self, start: torch.Tensor, t: int, length: int, group: int) -> torch.Tensor:
        """(n, 1, group * T, length) True where a query may attend: keys up to its own position (the
        T queries repeated for each query head of a group). (`forward` needs none for one token a
        row, every row at the full length.)"""
        keys = torch.arange(length, device=self.device)
        query = start.unsqueeze(1) + torch.arange(t, device=self.device)  # (n, T)
        mask = (keys.view(1, 1, length) <= query.unsqueeze(2)).unsqueeze(1)  # (n, 1, T, length)
        return mask.repeat(1, 1, group, 1)

    # -- rows
    def prefill(self, slot: int, prompt: list[int], adapter: str | None, *, weights_for: list[str | None] | None = None
                ) -> torch.Tensor:
        """Write ``prompt`` into ``slot`` (its earlier content dropped) and return the logits after
        its last token (V,), fp32. See `prefill_many`."""
        return self.prefill_many([slot], [prompt], [adapter], weights_for=weights_for)[0]

    @torch.inference_mode()
    def prefill_many(self, slots: list[int], prompts: list[list[int]], adapters: list[str | None], *,
                     weights_for: list[str | None] | None = None) -> list[torch.Tensor]:
        """Write each prompt into its slot (their earlier content dropped) and return the logits
        after each one's last token ((V,) each, fp32). Tokens the prefix cache holds for a row's
        adapter are copied; the rest is computed for all rows together, a chunk of each at a time.
        A prompt that shares a longer start with an earlier prompt of the call than the cache
        holds is prefilled after it, from the cache. ``weights_for``: the adapters of the rows that
        will step together (so the prefill runs the weights the steps will run)."""
        weights, rows = self.weights(weights_for or list(adapters))
        keys = [(adapter, weights.merged) for adapter in adapters]
        for prompt in prompts:
            self.reserve(len(prompt))
        logits: list[torch.Tensor | None] = [None] * len(prompts)
        left = list(range(len(prompts)))
        while left:
            now, later = [], []
            for i in left:  # a prompt waits for an earlier one it shares more with than the cache gives
                cached = self.prefixes.longest(prompts[i], keys[i])[0]
                shared = max((common_start(prompts[j], prompts[i]) for j in now if keys[j] == keys[i]), default=0)
                wait = self.prefixes.limit_bytes > 0 and min(shared, len(prompts[i]) - 1) > cached + _WORTH_WAITING
                (later if wait else now).append(i)
            done = [self._from_prefix(slots[i], prompts[i], keys[i]) for i in now]
            computed = self._compute([slots[i] for i in now], [prompts[i] for i in now], done,
                                     [adapters[i] for i in now], weights, rows)
            for i, row_logits in zip(now, computed):
                logits[i] = row_logits
                n = self.lengths[slots[i]] = len(prompts[i])
                self.prefixes.add(keys[i], prompts[i], self.keys[:, slots[i], :, :n], self.values[:, slots[i], :, :n])
            left = later
        return logits

    def _compute(self, slots, prompts, done, adapters, weights, rows) -> list[torch.Tensor]:
        """Prefill the prompts from ``done`` on, a chunk a row per forward, as many rows per forward as
        ``prefill_tokens`` allows; each one's logits after its last token."""
        done, logits = list(done), [None] * len(prompts)
        while True:
            active = [i for i in range(len(prompts)) if done[i] < len(prompts[i])]
            if not active:
                return logits
            pieces = {i: prompts[i][done[i]:done[i] + self.chunk] for i in active}
            width = max(len(p) for p in pieces.values())
            per_forward = max(1, self.prefill_tokens // width)
            for at in range(0, len(active), per_forward):
                group = active[at:at + per_forward]
                ids = torch.tensor([pieces[i] + [0] * (width - len(pieces[i])) for i in group], device=self.device)
                own = rows if rows is None else self._stack.rows([adapters[i] for i in group], self.device)
                out = self.forward(ids, [slots[i] for i in group], [done[i] for i in group], weights, own,
                                   counts=[len(pieces[i]) for i in group])
                for row, i in enumerate(group):
                    done[i] += len(pieces[i])
                    if done[i] == len(prompts[i]):
                        logits[i] = out[row]

    @torch.inference_mode()
    def step(self, tokens: list[int], adapters: list[str | None]) -> torch.Tensor:
        """Rows 0..n-1 take one token each; the logits (n, V), fp32."""
        n = len(tokens)
        weights, rows = self.weights(adapters)
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)
        logits = self.forward(ids, list(range(n)), self.lengths[:n], weights, rows)
        for i in range(n):
            self.lengths[i] += 1
        return logits

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Slot ``target`` becomes a copy of slot ``source`` (its cache and length)."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length

    @property
    def prefix_hits(self) -> int:
        """Prompt tokens taken from the prefix cache, since the start."""
        return self.prefixes.hits

    def _from_prefix(self, slot: int, prompt: list[int], key) -> int:
        """Copy the longest cached prefix of ``prompt`` into ``slot``; how many tokens it gave."""
        best, name = self.prefixes.longest(prompt, key)
        if best > 0:
            self.keys[:, slot, :, :best], self.values[:, slot, :, :best] = self.prefixes.take(name, best)
        return best
