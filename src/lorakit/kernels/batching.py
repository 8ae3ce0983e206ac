"""Mixed-adapter batches, the tensor math: every row of a batch through its own adapter, in one
forward pass (the `lorakit.batching` module stacks the adapters, picks the rows' slots and calls
these functions).

    y[b] = base(x[b]) + s_k B_k A_k x[b],     k = the adapter of row b (slot 0: no update)

the batching that multi-adapter servers do (Punica, Chen et al. 2023; S-LoRA, Sheng et al. 2023).

**The stack.** A layer's n adapters stacked by slot, built by the caller:

    A   (n+1, R, in)     slot 0 is zeros (no adapter), slot k holds adapter k's A_k
    Bt  (n+1, R, out)    s_k B_k^T: the scale (alpha/r, or alpha/sqrt(r) with rsLoRA) folded in

R is the largest rank of the layer's adapters; a smaller A_k, B_k is padded with zeros, which adds
exact zeros (the result is the adapter's own). ``slots`` (B,) holds each row's slot.

**Two ways to apply it, the same numbers.** With T tokens per row and U adapters in the batch:

    gather  h = bmm(x, A[slot]^T)               (B, T, R)    each row its own A_k and B_k:
            y = base(x) + bmm(h, Bt[slot])      (B, T, out)  copies of B x R x (in + out)
    dense   h = x @ [A_1; ..; A_U]^T            (B, T, U R)  every row through the U adapters,
            h = h * onehot(row's adapter)       (B, T, U R)  keep its own R columns
            y = base(x) + h @ [Bt_1; ..; Bt_U]  (B, T, out)  (views of the stack when slots are one run)

Dense multiplies every row by all U adapters (U times gather's FLOPs) but copies nothing; gather
copies each row's adapter (small beside the T x in activations it multiplies). Dense is used for
one adapter (it is then plain LoRA with a row mask) and while T * U <= `DENSE_MAX`; measured on a
2-core CPU for SmolLM2's projections, 16 rows, r=16: dense is faster up to T * U of about 4 and
gather beyond (2-3x faster at U = 16 for one decoded token). Neither loops over the adapters in
Python. (torch's grouped_mm, which would do neither, was 2-10x slower than both on the CPU.)

**DoRA** rows are scaled by c = m / ||W + s B A||, one vector per adapter stacked like B (c = 1
for plain LoRA and slot 0); with y = base(x) + lora:

    y' = y + (c - 1) * (y - bias)

the DoRA eval forward ``c * (base(x) - bias + lora) + bias`` rearranged.

**An embedding** looks up row b's tokens in A_k^T, the stack laid out as one (n+1) vocab x R
table: ``E[ids] + A_k^T[ids] @ Bt_k``, row b's ids offset by slot_b * vocab.

Every function takes its tensors already in the compute dtype and adds onto ``y`` (a fresh
base output no one saved) in place where it can.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DENSE_MAX", "dense", "gather", "dora", "embedding"]

DENSE_MAX = 4  # the dense path runs for one adapter, or while tokens per row x adapters is at most this


def dense(y: torch.Tensor, x: torch.Tensor, a_u: torch.Tensor, bt_u: torch.Tensor,
          mask: torch.Tensor | None) -> torch.Tensor:
    """``y + ((x @ A_u^T) * mask) @ Bt_u``, onto ``y`` in place. y (B, T, out), x (B, T, in),
    a_u (U R, in), bt_u (U R, out), mask (B, 1, U R) or None (every row the one adapter)."""
    shape = y.shape
    h = x @ a_u.T  # (B, T, U R)
    if mask is not None:
        h = h * mask  # (B, T, U R): row b keeps its adapter's R columns
    # in place onto base(x): no second tensor of its size
    y = y.reshape(-1, shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), bt_u)  # (B T, out): + lora
    return y.view(shape)


def gather(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``y + bmm(bmm(x, A[slot]^T), Bt[slot])``, onto ``y`` in place. y (B, T, out), x (B, T, in),
    a (n+1, R, in), bt (n+1, R, out), slots (B,)."""
    h = torch.bmm(x, a.index_select(0, slots).transpose(1, 2))  # (B, T, R)
    return y.baddbmm_(h, bt.index_select(0, slots))  # (B, T, out): + lora, in place


def dora(y: torch.Tensor, c_minus_1: torch.Tensor, slots: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """DoRA's rows: ``y + (c - 1) * (y - bias)``. y (B, T, out) = base(x) + lora, c_minus_1
    (n+1, out) fp32 (0 for plain LoRA slots), bias (out,) or None."""
    c1 = c_minus_1.index_select(0, slots).unsqueeze(1).to(y.dtype)  # (B, 1, out)
    return y + c1 * (y - bias.to(y.dtype) if bias is not None else y)


def embedding(y: torch.Tensor, ids: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``E[ids] + A_k^T[ids] @ Bt_k`` per row: one lookup in the stacked table. y (B, T, dim) =
    E[ids], ids (B, T), a (n+1, vocab, R), bt (n+1, R, dim), slots (B,)."""
    vocab = a.shape[1]
    h = F.embedding(ids + slots[:, None] * vocab, a.view(-1, a.shape[-1]))  # (B, T, R)
    return torch.baddbmm(y, h, bt.index_select(0, slots))  # (B, T, dim): + lora
