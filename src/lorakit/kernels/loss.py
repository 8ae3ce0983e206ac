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

from lorakit.errors import ConfigError

__all__ = ["head_cross_entropy", "head_log_probs", "STATS", "DEFAULT_CHUNK"]

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


STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
"""The per-token statistics `head_log_probs` computes besides the log-probabilities."""


def _chunk_logits(h: torch.Tensor, head: nn.Module, w: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """One chunk's logits in fp32, divided by the temperature."""
    logits = (h.to(w.dtype) @ w.t()).float() if w is not None else head(h).float()
    if w is not None and head.bias is not None:
        logits = logits + head.bias.float()
    return logits / temperature if temperature != 1.0 else logits


def _token_terms(z: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log-probability of each label, entropy, log-softmax) of fp32 logits ``z`` (n, V)."""
    log_p = torch.log_softmax(z, dim=-1)
    return log_p.gather(1, labels[:, None]).squeeze(1), -(log_p.exp() * log_p).sum(-1), log_p


class _HeadLogProbs(torch.autograd.Function):
    """(log-probabilities, entropies) of the labels, chunk by chunk; the other statistics go into
    ``extra`` without gradient. A frozen linear head saves each token's d(log p)/dh in the forward
    (the backward only scales it); any other head, or a gradient through the entropy, recomputes
    its chunks in the backward."""

    @staticmethod
    def forward(ctx, hidden, labels, head, chunk, temperature, stats, extra, *params):
        ctx.set_materialize_grads(False)  # an output no loss uses (the logged entropy) gets None, not zeros
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        ctx.autocast = (device, autocast, torch.get_autocast_dtype(device) if autocast else None)
        fast = _frozen_linear(head)
        w = head.weight.to(torch.get_autocast_dtype(device) if autocast else hidden.dtype) if fast else None
        keep_jacobian = fast and ctx.needs_input_grad[0]
        n = hidden.shape[0]
        log_probs = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_empty(n, dtype=torch.float32)
        wanted = {name: hidden.new_empty(n, dtype=torch.bool if name == "is_top1" else torch.float32)
                  for name in stats}
        jacobian = torch.empty_like(hidden) if keep_jacobian else None
        with torch.no_grad():
            for start in range(0, n, chunk):
                h, y = hidden[start:start + chunk], labels[start:start + chunk]
                z = _chunk_logits(h, head, w, temperature)
                lp, ent, log_p = _token_terms(z, y)
                log_probs[start:start + chunk], entropy[start:start + chunk] = lp, ent
                if "log_sum_sq_probs" in stats:
                    wanted["log_sum_sq_probs"][start:start + chunk] = torch.logsumexp(2 * log_p, dim=-1)
                if "mean_logits" in stats:
                    wanted["mean_logits"][start:start + chunk] = z.mean(-1)
                if "is_top1" in stats:
                    wanted["is_top1"][start:start + chunk] = z.argmax(-1) == y  # the first maximum, as argmax
                if keep_jacobian:  # d(log p_y)/dz = onehot(y) - softmax(z); dz/dh = W / temperature
                    grad = log_p.exp_().neg_()
                    grad[torch.arange(len(y), device=y.device), y] += 1.0
                    jacobian[start:start + chunk] = ((grad / temperature).to(w.dtype) @ w).to(hidden.dtype)
        extra.update(wanted)
        ctx.save_for_backward(hidden, labels, *([jacobian] if keep_jacobian else []))
        ctx.head, ctx.chunk, ctx.temperature, ctx.keep_jacobian = head, chunk, temperature, keep_jacobian
        ctx.n_params = len(params)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        hidden, labels, *jacobian = ctx.saved_tensors
        params = [p for p in ctx.head.parameters() if p.requires_grad][:ctx.n_params] if ctx.n_params else []
        if ctx.keep_jacobian and grad_entropy is None and not params:
            return (jacobian[0] * grad_log_probs[:, None].to(hidden.dtype), *[None] * 6)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_params = [torch.zeros_like(p) for p in params]
        device, enabled, dtype = ctx.autocast
        for start in range(0, hidden.shape[0], ctx.chunk):
            with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
                h = hidden[start:start + ctx.chunk].detach().requires_grad_(grad_hidden is not None)
                lp, ent, _ = _token_terms(_chunk_logits(h, ctx.head, None, ctx.temperature),
                                          labels[start:start + ctx.chunk])
                total = 0.0
                if grad_log_probs is not None:
                    total = total + (lp * grad_log_probs[start:start + ctx.chunk]).sum()
                if grad_entropy is not None:
                    total = total + (ent * grad_entropy[start:start + ctx.chunk]).sum()
                if not torch.is_tensor(total):
                    continue
                inputs = ([h] if grad_hidden is not None else []) + params
                grads = list(torch.autograd.grad(total, inputs, allow_unused=True))
            if grad_hidden is not None:
                grad_hidden[start:start + ctx.chunk] = grads.pop(0)
            for acc, g in zip(grad_params, grads):
                if g is not None:
                    acc += g
        return (grad_hidden, *[None] * 6, *grad_params)


def head_log_probs(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, *, temperature: float = 1.0,
                   stats: tuple[str, ...] = (), chunk: int = DEFAULT_CHUNK) -> dict[str, torch.Tensor]:
    """Per-token statistics of the next-token distribution ``softmax(head(hidden) / temperature)``
    over (N, H) hidden states and their (N,) labels, chunk by chunk (no (N, V) logits kept):
    ``log_probs`` (log p of each label) and ``entropy`` with gradients with respect to ``hidden``
    and the head's trainable parameters; of ``stats`` (`STATS`), ``log_sum_sq_probs``
    (log sum_v p_v^2), ``mean_logits`` (mean temperature-scaled logit) and ``is_top1`` (the label
    is the first most likely token) without gradient. fp32 values, as from the full logits."""
    unknown = set(stats) - set(STATS)
    if unknown:
        raise ConfigError(f"head_log_probs: unknown statistics {sorted(unknown)}; choose among {STATS}")
    params = [p for p in head.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    extra: dict[str, torch.Tensor] = {}
    log_probs, entropy = _HeadLogProbs.apply(hidden, labels, head, chunk, float(temperature),
                                             tuple(s for s in stats if s != "entropy"), extra, *params)
    return {"log_probs": log_probs, "entropy": entropy, **extra}
