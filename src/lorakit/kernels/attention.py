"""Attention for training on short sequences: one matmul-softmax-matmul node per layer.

transformers' "sdpa" attention on CPU dispatches to a flash-attention kernel that is built for
long sequences: for fine-tuning batches of a few hundred tokens its backward is slower than two
plain batched matmuls, and with any mask (padding, or packed examples) transformers also copies
the key and value heads for grouped-query attention. `attend` computes

    S = (scale Q) K^T      P = softmax(S + mask)      O = P V
    dS = P * (dP - rowsum(dO * O))                    (rowsum(P * dP) = rowsum(dO * O))

as one autograd node: grouped-query heads share their key/value head without copies (the query
heads of a group are stacked along the sequence axis), the softmax accumulates in fp32 inside
PyTorch's kernel with no fp32 copy of the scores, and the backward reuses the saved P (kept in
the compute dtype, as the matmul that follows needs it) instead of recomputing it. It saves up
to B x H x S x S probabilities per layer (3/4 of that from MIN_SPLIT tokens on), so it runs only
up to `MAX_SCORES` scores per layer and only for self-attention over the whole sequence
(`usable`); the caller sends anything else to another attention.

A one-row batch of examples laid end to end (``cu_seq_lens``, the trainer's packing) is
gathered into one padded row per example for this node, and back (`attend_varlen`), so the rest
of the model runs on the real tokens only; a prompt head shared by all the examples can be laid
down once and seen by each as its own. The layout of the rows (`varlen_layout`) is built once per
batch by the caller and passed to every layer; nothing is cached here.

Hooking this into a transformers model is `lorakit.models.attention`'s job. Tests compare it with
sdpa on outputs and gradients, padded and packed (tests/models/test_attention.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from lorakit.errors import DataError

__all__ = ["MAX_SCORES", "MIN_SPLIT", "VarlenLayout", "attend", "attend_varlen", "causal_mask", "stream_mask",
           "usable", "varlen_layout"]

MIN_SPLIT = 64  # from this sequence length on, the masked quarter of causal attention is skipped
MAX_SCORES = 1 << 23  # B x H x Sq x Sk per layer: 8 x 9 x 256 x 256 = 4.7M; 16 MiB of bf16 probabilities


def _part_forward(qg, k, v, mask):
    """One block of query rows against the keys they may see: (probabilities, output).

    qg (B, Hkv, g*Sq, D), already scaled, the g query heads of a group stacked along the rows;
    k, v (B, Hkv, Sk, D); mask (B|1, 1, Sq, Sk), True = attend.
    """
    b, hkv, gsq, _ = qg.shape
    sq, sk = mask.shape[-2], k.shape[2]
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, hkv, gsq // sq, sq, sk)  # (B, Hkv, g, Sq, Sk)
    scores.masked_fill_(~mask.unsqueeze(2), _masked(scores.dtype))
    probs = torch.softmax(scores, dim=-1).view(b, hkv, gsq, sk)  # accumulated in fp32 by the kernel
    return probs, torch.matmul(probs, v)  # (B, Hkv, g*Sq, Sk), (B, Hkv, g*Sq, D)


def _part_backward(qg, k, v, probs, out, grad_out, scale):
    """Gradients of one block: (dq, dk, dv) for its query rows and the keys it saw."""
    grad_v = torch.matmul(probs.transpose(-1, -2), grad_out)  # (B, Hkv, Sk, D)
    # dS = P * (dP - rowsum(P * dP)), and rowsum(P * dP) = rowsum(dO * O): a (g*Sq, D) product, not (g*Sq, Sk)
    delta = (grad_out.float() * out.float()).sum(-1, keepdim=True).to(out.dtype)  # (B, Hkv, g*Sq, 1)
    grad_s = torch.matmul(grad_out, v.transpose(-1, -2)).sub_(delta).mul_(probs)  # (B, Hkv, g*Sq, Sk)
    grad_q = torch.matmul(grad_s, k).mul_(scale)  # (B, Hkv, g*Sq, D)
    grad_k = torch.matmul(grad_s.transpose(-1, -2), qg)  # (B, Hkv, Sk, D)
    return grad_q, grad_k, grad_v


def _rows(x, start, stop):
    """Rows start:stop of every head of x (B, Hkv, g, S, D), stacked: (B, Hkv, g*(stop-start), D)."""
    b, hkv, g, _, d = x.shape
    return x[:, :, :, start:stop].reshape(b, hkv, g * (stop - start), d)


class _Attention(torch.autograd.Function):
    """Causal attention in two blocks of query rows: the first half of the queries sees only the
    first half of the keys (the other quarter of S x S is masked for any causal mask, padded or
    packed), the second half sees all keys; a quarter of the work is never done."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        # q (B, H, S, D); k, v (B, Hkv, S, D); mask bool, broadcastable to (B, 1, S, S), True = attend
        b, h, s, d = q.shape
        hkv = k.shape[1]
        q5 = (q * scale).reshape(b, hkv, h // hkv, s, d)  # (B, Hkv, g, S, D)
        half = s // 2 if s >= MIN_SPLIT else 0
        parts = [(0, half, half), (half, s, s)] if half else [(0, s, s)]  # (first row, end row, keys seen)
        saved, outs = [], []
        for start, stop, keys in parts:
            qg = _rows(q5, start, stop)
            probs, out = _part_forward(qg, k[:, :, :keys], v[:, :, :keys], mask[..., start:stop, :keys])
            saved += [qg, probs, out]
            outs.append(out.view(b, hkv, -1, stop - start, d))
        ctx.save_for_backward(k, v, *saved)
        ctx.scale, ctx.parts = scale, parts
        out = torch.cat(outs, dim=3) if len(outs) > 1 else outs[0]  # (B, Hkv, g, S, D)
        return out.view(b, h, s, d)

    @staticmethod
    def backward(ctx, grad_out):
        k, v, *saved = ctx.saved_tensors
        b, h, s, d = grad_out.shape
        hkv = k.shape[1]
        go5 = grad_out.reshape(b, hkv, h // hkv, s, d)
        grad_k, grad_v = torch.zeros_like(k), torch.zeros_like(v)
        grad_qs = []
        for i, (start, stop, keys) in enumerate(ctx.parts):
            qg, probs, out = saved[3 * i: 3 * i + 3]
            gq, gk, gv = _part_backward(qg, k[:, :, :keys], v[:, :, :keys], probs, out,
                                        _rows(go5, start, stop), ctx.scale)
            grad_k[:, :, :keys] += gk
            grad_v[:, :, :keys] += gv
            grad_qs.append(gq.view(b, hkv, -1, stop - start, d))
        grad_q = torch.cat(grad_qs, dim=3) if len(grad_qs) > 1 else grad_qs[0]
        return grad_q.view(b, h, s, d), grad_k, grad_v, None, None


def _masked(dtype: torch.dtype) -> float:
    """A finite "minus infinity": a fully masked (padding) row gives a uniform row, not NaN."""
    return torch.finfo(dtype).min


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           dropout: float, scores: int | None = None) -> bool:
    """Whether `attend` computes this self-attention: q (B, H, Sq, D), k and v (B, Hkv, Sk, D) of one
    dtype, Sq = Sk, H a multiple of Hkv, no dropout, a boolean mask or none, and at most `MAX_SCORES`
    scores; ``scores``: B x H x Sq x Sk as it will run (the padded rows of a variable-length stream,
    `VarlenLayout.scores`), else the query's own."""
    b, h, sq, _ = query.shape
    sk = key.shape[2]
    return (
        sq == sk and dropout == 0.0 and (scores or b * h * sq * sk) <= MAX_SCORES and h % key.shape[1] == 0
        and (attention_mask is None or attention_mask.dtype == torch.bool)
        and query.dtype == key.dtype == value.dtype
    )


def causal_mask(s: int, device: torch.device) -> torch.Tensor:
    """(1, 1, S, S) lower-triangular, True = attend: plain causal attention."""
    return torch.ones(s, s, dtype=torch.bool, device=device).tril()[None, None]


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
           scale: float | None = None) -> torch.Tensor:
    """``softmax(scale Q K^T + mask) V`` as one autograd node: (B, S, H, D), from q (B, H, S, D) and
    k, v (B, Hkv, S, D). ``attention_mask``: boolean, True = attend, broadcastable to (B, 1, S, S)
    (only its first head is read); None: causal. ``scale``: 1/sqrt(D) unless given. Only where
    `usable` says so."""
    s = query.shape[2]
    if attention_mask is None:  # transformers leaves the mask out when plain causal attention is meant
        attention_mask = causal_mask(s, query.device)
    mask = attention_mask[..., :s, :s]  # (B|1, 1|H, S, S)
    if mask.shape[1] != 1:
        mask = mask[:, :1]
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = _Attention.apply(query, key, value, mask, scale)
    return out.transpose(1, 2).contiguous()


class VarlenLayout(NamedTuple):
    """How a one-row stream of examples lies in B padded rows of length L, one row per example
    (`varlen_layout` builds it, once per batch)."""

    index: torch.Tensor  # (B*L,) the stream position of each slot (padding slots: position 0, never seen)
    inverse: torch.Tensor  # (T,) the one slot each stream position is read back from
    mask: torch.Tensor  # (B, 1, L, L) causal within each row, True = attend

    def scores(self, heads: int) -> int:
        """B x H x L x L: the scores `attend_varlen` computes per layer with ``heads`` query heads."""
        return self.mask.shape[0] * heads * self.mask.shape[-1] ** 2


def _segments(cu_seq_lens: torch.Tensor, prefix: int, parents: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(starts, lengths, parents) of every segment of the stream: ``parents[s]`` is the segment
    that segment ``s`` continues (its prefix), or -1. A shared ``prefix`` of P tokens is the first
    segment, the parent of all the others."""
    bad = cu_seq_lens.ndim != 1 or len(cu_seq_lens) < 2 + bool(prefix) or int(cu_seq_lens[0]) != 0 \
        or (prefix and int(cu_seq_lens[1]) != prefix)
    if bad:
        raise DataError(f"cu_seq_lens must be the example boundaries [0, l0, l0+l1, ..., T] of a one-row batch, "
                        f"starting [0, P, ...] with a shared prefix of P tokens (PackingCollator(varlen=True) "
                        f"makes them); got {cu_seq_lens.tolist()} with prefix {prefix}")
    starts, lengths = cu_seq_lens[:-1].long(), (cu_seq_lens[1:] - cu_seq_lens[:-1]).long()
    if parents is None:
        parents = torch.full_like(starts, -1)
        if prefix:
            parents[1:] = 0
    elif prefix or parents.shape != starts.shape or bool(((parents >= torch.arange(len(starts), device=parents.device))
                                                          | (parents < -1)).any()):
        raise DataError(f"segment parents must give, for each of the {len(starts)} segments of cu_seq_lens, an earlier "
                        f"segment it continues, or -1 (and no shared prefix with them); got {parents.tolist()}")
    return starts, lengths, parents.long()


def varlen_layout(cu_seq_lens: torch.Tensor, prefix: int = 0, parents: torch.Tensor | None = None) -> VarlenLayout:
    """The `VarlenLayout` of a one-row stream of examples.

    ``cu_seq_lens`` = [0, l0, l0+l1, ..., T] are the segment boundaries. With a shared ``prefix``
    of P tokens the stream is the prefix (the first segment, [0, P)) and then each example's own
    tokens: row b is the prefix followed by segment b, so every example sees the prefix as if it
    were its own (its positions continue from P); each prefix position is read back from row 0.
    ``parents`` generalises this to a prefix per example (a preference pair's prompt, followed by
    its chosen and its rejected answer): segment s continues segment ``parents[s]`` (-1: none); a
    segment that others continue is no row of its own, it heads each of theirs and is read back
    from the first. Built once per batch (it reads the boundaries' values: a device sync) and
    passed to every layer's attention."""
    starts, lengths, parents = _segments(cu_seq_lens, prefix, parents)
    is_parent = torch.zeros_like(parents, dtype=torch.bool)
    is_parent[parents[parents >= 0]] = True
    rows = (~is_parent).nonzero().squeeze(1)  # (B,) the segments that are rows
    has_head = parents[rows] >= 0
    head = parents[rows].clamp(min=0)
    head_start = torch.where(has_head, starts[head], 0)
    head_len = torch.where(has_head, lengths[head], 0)
    own_start, own_len = starts[rows], lengths[rows]
    longest = int((head_len + own_len).max())
    pos = torch.arange(longest, device=cu_seq_lens.device)
    valid = pos < (head_len + own_len)[:, None]  # (B, L)
    in_head = pos < head_len[:, None]
    index = torch.where(valid, torch.where(in_head, head_start[:, None] + pos,
                                           own_start[:, None] + pos - head_len[:, None]), 0)
    # each position of a head is read back once, from the first row it heads
    first_of_head = torch.ones_like(has_head)
    seen: set[int] = set()
    for b, (h, with_head) in enumerate(zip(head.tolist(), has_head.tolist())):
        if with_head:
            first_of_head[b] = h not in seen
            seen.add(h)
    read = valid & (~in_head | first_of_head[:, None])
    slots = read.reshape(-1).nonzero().squeeze(1)
    total = int(cu_seq_lens[-1])
    if len(slots) != total:
        raise DataError(f"the segments of cu_seq_lens {cu_seq_lens.tolist()} with parents {parents.tolist()} do not "
                        f"cover the stream once: a parent segment must head at least one other")
    index = index.reshape(-1)
    inverse = torch.empty(total, dtype=torch.long, device=cu_seq_lens.device)
    inverse[index[slots]] = slots  # the one slot each stream position is read back from
    causal = torch.ones(longest, longest, dtype=torch.bool, device=cu_seq_lens.device).tril()
    mask = (causal & valid[:, None, :])[:, None]  # (B, 1, L, L)
    return VarlenLayout(index, inverse, mask)


def stream_mask(cu_seq_lens: torch.Tensor, prefix: int = 0, parents: torch.Tensor | None = None) -> torch.Tensor:
    """The (1, 1, T, T) mask of the same stream over the whole row, True = attend: each position
    sees the earlier positions of its own segment and of the segment it continues (the shared
    prefix, or its ``parents`` entry). For attention that cannot take the padded rows
    (`varlen_layout`); T x T work."""
    starts, lengths, parents = _segments(cu_seq_lens, prefix, parents)
    segment = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seq_lens.device), lengths)  # (T,)
    t = len(segment)
    causal = torch.ones(t, t, dtype=torch.bool, device=cu_seq_lens.device).tril()
    own = segment[:, None] == segment[None, :]
    continued = parents[segment][:, None] == segment[None, :]
    return (causal & (own | continued))[None, None]


def attend_varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: VarlenLayout,
                  scale: float | None = None) -> torch.Tensor:
    """Attention over a (1, H, T, D) stream of examples as B padded rows, each example seeing only
    itself (and the shared prefix): (1, T, H, D). The projections before and after run on the T
    positions of the stream, with no padding rows. Only where `usable` says so, with
    ``scores=layout.scores(H)``."""
    index, inverse, mask = layout
    b, longest = mask.shape[0], mask.shape[-1]

    def rows(x):  # (1, H, T, D) -> (B, H, L, D)
        return x[0].index_select(1, index).view(x.shape[1], b, longest, x.shape[-1]).transpose(0, 1)

    q, k, v = rows(query), rows(key), rows(value)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out = _Attention.apply(q, k.contiguous(), v.contiguous(), mask, scale)  # (B, H, L, D)
    out = out.transpose(1, 2).reshape(b * longest, *out.shape[1:2], out.shape[-1])  # (B*L, H, D)
    return out.index_select(0, inverse)[None]  # (1, T, H, D)
