"""What a request is and how a row picks its next token: the pieces that every decode loop shares
(`lorakit.generation.engine`'s loop over the model, and `lorakit.generation.batcher`'s over the
fast decoder).

Each row picks its next token by its own `Sampling`: greedy (``temperature=0``, the argmax) or
sampled from ``softmax(warp(logits))`` with a `torch.Generator` of its own, seeded by
``Sampling.seed``, so a row's draws do not depend on its batch neighbours. ``warp`` is
transformers' temperature, then top-k, then top-p (nucleus, Holtzman et al. 2019) warping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorakit.errors import ConfigError

__all__ = ["Sampling", "Request", "warp_logits", "eos_token_ids", "row_ended", "finish_reason", "next_tokens",
           "generator", "pad_token_id", "is_int"]


@dataclass
class Sampling:
    """How one request picks its tokens."""

    temperature: float = 0.0
    """0 = greedy (the most likely token); above 0, logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose probabilities add up to top_p (1 = all)."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    seed: int | None = None
    """Seeds this request's own generator: the same seed gives the same tokens (None = random)."""
    max_new_tokens: int = 128
    """At most this many generated tokens."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the completion (besides the model's EOS); the stop token is kept in the output."""

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)
        problems = []
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            problems.append(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1] (1 = no nucleus cut), got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 = no top-k cut), got {self.top_k!r}")
        if self.seed is not None and not is_int(self.seed):
            problems.append(f"seed must be an integer or None, got {self.seed!r}")
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not all(is_int(t) and t >= 0 for t in self.stop_token_ids):
            problems.append(f"stop_token_ids must be token ids (integers >= 0), got {self.stop_token_ids!r}")
        if problems:
            raise ConfigError("Sampling: " + "; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """One prompt (token ids, e.g. from `lorakit.data.chat.chat_prompt_ids`) and how to complete it."""

    prompt_ids: list[int]
    adapter: str | None = None
    """The adapter's name on the model; None (or "__base__") = the base model without adapters."""
    sampling: Sampling = field(default_factory=Sampling)


def warp_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor) -> torch.Tensor:
    """transformers' sampling warpers, one setting per row: logits (B, V) / temperature (B,),
    then keep the top_k (B,) largest (0 = all; ties with the k-th kept), then the smallest set of
    most likely tokens whose probability reaches top_p (B,) (1 = all; the most likely always
    kept). Removed tokens get -inf."""
    scores = logits / temperature.unsqueeze(1)  # (B, V)
    vocab = scores.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))  # (B,)
    kth = scores.sort(dim=-1, descending=True).values.gather(1, (k - 1).unsqueeze(1))  # (B, 1)
    cut_k = (scores < kth) & (top_k > 0).unsqueeze(1)  # (B, V)
    scores = scores.masked_fill(cut_k, -float("inf"))
    ascending, order = scores.sort(dim=-1)  # (B, V)
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    cut_p = cumulative <= (1 - top_p).unsqueeze(1)  # (B, V), in ascending order
    cut_p[:, -1] = False  # keep the most likely token
    cut_p &= (top_p < 1).unsqueeze(1)
    return scores.masked_fill(cut_p.scatter(1, order, cut_p), -float("inf"))


def eos_token_ids(model, tokenizer) -> set[int]:
    """The ids that end a completion: the model's generation config's EOS (one or a list) and
    the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    for source in (getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    return ids


def _stopped(ids: list[int], request: Request, eos: set[int]) -> bool:
    """Whether the completion's last token is EOS or one of the request's stop tokens."""
    return bool(ids) and (ids[-1] in eos or ids[-1] in request.sampling.stop_token_ids)


def row_ended(ids: list[int], request: Request, eos: set[int]) -> bool:
    """Whether a row's completion ``ids`` is over: its last token is EOS or one of its stop
    tokens, or it has ``max_new_tokens``. The loop's rule, for callers that follow it token by token."""
    return _stopped(ids, request, eos) or len(ids) >= request.sampling.max_new_tokens


def finish_reason(ids: list[int], request: Request, eos: set[int]) -> str:
    """"stop" when the completion ended at EOS or a stop token, else "length" (OpenAI's words)."""
    return "stop" if _stopped(ids, request, eos) else "length"


# -- the pieces of the loop

def next_tokens(logits: torch.Tensor, settings: list[Sampling], generators: list[torch.Generator]) -> list[int]:
    """Each row's next token: the argmax of its logits (rows, V), or a draw from its warped
    distribution with its own generator."""
    tokens = logits.argmax(dim=-1).tolist()  # (rows,)
    rows = [j for j, s in enumerate(settings) if not s.greedy]
    if rows:
        device = logits.device
        warped = warp_logits(logits[rows],
                             torch.tensor([settings[j].temperature for j in rows], device=device, dtype=logits.dtype),
                             torch.tensor([settings[j].top_k for j in rows], device=device),
                             torch.tensor([settings[j].top_p for j in rows], device=device, dtype=logits.dtype))
        probs = warped.softmax(dim=-1)  # (sampled rows, V)
        for k, j in enumerate(rows):
            tokens[j] = int(torch.multinomial(probs[k:k + 1], 1, generator=generators[j]))
    return tokens


def generator(seed: int | None, device) -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()  # a fresh non-deterministic seed
    else:
        g.manual_seed(seed)
    return g


def pad_token_id(model, tokenizer, eos: set[int]) -> int:
    """The tokenizer's pad id, else the model's, else an EOS id, else 0 (padding is masked out)."""
    for source in (tokenizer, getattr(model, "generation_config", None), getattr(model, "config", None)):
        pad = getattr(source, "pad_token_id", None)
        if isinstance(pad, int):
            return pad
    return min(eos) if eos else 0


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
