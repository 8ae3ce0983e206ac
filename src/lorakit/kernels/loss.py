"""Cross-entropy through the output head, a chunk of tokens at a time.

The usual path computes ``logits = head(hidden)`` for every position, (B, T, V) in fp32 for
the loss, then its log-softmax, then the same sizes again in the backward: for a 49,152-token
vocabulary and 2,048 positions that is 400 MB per copy. Here the caller passes only the label
positions (prompt and padding never reach the head), and `head_cross_entropy` walks them in
chunks: per chunk the logits are made, the summed loss taken, and the gradient with respect to
the hidden states computed at once, so that no more than one chunk of fp32 logits ever exists
and the backward only scales the saved (N, H) gradient.

    loss  = sum_i  logsumexp(z_i) - z_i[y_i]            z_i = head(h_i), in fp32
    dL/dz = softmax(z_i) - onehot(y_i)                  dL/dh_i = head^T (dL/dz_i)

A frozen `nn.Linear` head (the usual case; tied to the embeddings) takes a hand-written path; a
head with trainable parameters (an adapter on ``lm_head``, or ``modules_to_save``) gets its
gradients per chunk from autograd. Tests compare both with ``F.cross_entropy`` on full logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["head_cross_entropy", "DEFAULT_CHUNK"]

DEFAULT_CHUNK = 1024  # label positions per chunk: 1024 x 49,152 fp32 logits = 192 MiB at most


def _frozen_linear(head: nn.Module) -> bool:
    return type(head) is nn.Linear and not any(p.requires_grad for p in head.parameters())


def _chunk_frozen_linear(h: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                         want_grad: bool):
    """(summed loss, dL/dh or None) for one chunk through a frozen linear head, whose weight ``w``
    is already in the compute dtype."""
    dtype = w.dtype
    logits = (h.to(dtype) @ w.t()).float()  # (n, V)
    if bias is not None:
        logits += bias.float()
    target = logits.gather(1, labels[:, None]).squeeze(1)  # (n,)
    top = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    probs = logits.sub_(top).exp_()  # in place of the logits: exp(z - max), no temporary
    sums = probs.sum(dim=-1, keepdim=True)  # (n, 1)
    loss = (sums.log().add_(top).squeeze(1) - target).sum()  # logsumexp(z) - z[y]
    if not want_grad:
        return loss, None
    probs.div_(sums)  # softmax
    probs[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    return loss, (probs.to(dtype) @ w).to(h.dtype)  # (n, H)


def _chunk_autograd(h: torch.Tensor, labels: torch.Tensor, head: nn.Module, params: list, want_grad: bool):
    """(summed loss, dL/dh or None, [dL/dp]) for one chunk through any head, by autograd."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(want_grad)
        loss = F.cross_entropy(head(h).float(), labels, reduction="sum")
        if not want_grad and not params:
            return loss.detach(), None, []
        inputs = ([h] if want_grad else []) + params
        grads = torch.autograd.grad(loss, inputs)
    grad_h = grads[0] if want_grad else None
    return loss.detach(), grad_h, list(grads[1:] if want_grad else grads)


class _HeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, labels, head, chunk, *params):
        want_grad = ctx.needs_input_grad[0]  # params: only those that require grad (the caller's rule)
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        grad_params = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        fast = _frozen_linear(head)
        if fast:  # the weight in the compute dtype once, not per chunk
            device = hidden.device.type
            w = head.weight.to(torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            if fast:
                loss, g = _chunk_frozen_linear(h, y, w, head.bias, want_grad)
            else:
                loss, g, gp = _chunk_autograd(h, y, head, list(params), want_grad)
                for acc, part in zip(grad_params, gp):
                    acc += part
            total += loss
            if want_grad:
                grad_hidden[start:start + chunk] = g
        ctx.save_for_backward(*([grad_hidden] if want_grad else []), *grad_params)
        ctx.want_grad, ctx.param_dtypes = want_grad, [p.dtype for p in params]
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_out if ctx.want_grad else None  # grad_out: a 0-dim fp32 scale
        grad_params = [g.mul(grad_out).to(dtype) for g, dtype in zip(saved, ctx.param_dtypes)]
        return (grad_hidden, None, None, None, *grad_params)


def head_cross_entropy(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                       chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """``sum_i cross_entropy(head(hidden[i]), labels[i])`` over (N, H) hidden states, chunk by chunk.

    Equal to ``F.cross_entropy(head(hidden).float(), labels, reduction="sum")`` in value and in
    its gradients with respect to ``hidden`` and the head's trainable parameters.
    """
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return _HeadCrossEntropy.apply(hidden, labels, head, chunk, *params)
