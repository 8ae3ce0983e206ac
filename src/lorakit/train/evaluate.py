"""The loss on label tokens, held-out loss, and the task score by batched greedy generation."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from lorakit.data import IGNORE_INDEX, Collator, Example
from lorakit.infer.generate import generate_texts
from lorakit.kernels.loss import head_cross_entropy
from lorakit.models.attention import varlen_inputs
from lorakit.models.family import LLAMA_FAMILY, unwrap

__all__ = [
    "loss_sum", "model_inputs", "heldout_loss", "ScoreResult", "score_examples", "split_prompt", "scorer_for", "evaluate_adapter",
]

# Architectures whose logits are exactly lm_head(final hidden state): for these the output head
# runs on the label positions only (prompt and padding tokens never reach the vocabulary).
HEAD_ON_LABELS_ONLY = LLAMA_FAMILY


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch the model takes: a padded batch has ``attention_mask``; a packed one has
    ``position_ids`` that restart at each example (and no mask), which keeps attention inside it
    as long as the forward builds no key/value cache (``use_cache=False``, as `loss_sum` passes)."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "cu_seq_lens" in batch:  # one row of examples end to end (PackingCollator(varlen=True)), laid out once
        # lorakit's attention: every example continues the row's first P tokens (the shared prefix)
        inputs |= varlen_inputs(batch["cu_seq_lens"], int(batch.get("shared_prefix", 0)))
    return inputs


def loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over label tokens, number of label tokens).

    Summing (not averaging) lets gradient accumulation divide by the tokens of the whole step.
    """
    lm = unwrap(model)
    labels = batch["labels"][:, 1:]  # (B, T-1): token t+1 is predicted at position t
    mask = labels != IGNORE_INDEX  # (B, T-1)
    count = int(mask.sum())
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    if model_type in HEAD_ON_LABELS_ONLY and hasattr(lm, "get_decoder"):
        hidden = lm.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state  # (B, T, H)
        picked = hidden[:, :-1][mask]  # (N, H)
        return head_cross_entropy(picked, lm.get_output_embeddings(), labels[mask]), count
    logits = model(**model_inputs(batch), use_cache=False).logits
    logits = logits[:, :-1].float()  # (B, T-1, V)
    return F.cross_entropy(logits[mask], labels[mask], reduction="sum"), count


@torch.no_grad()
def heldout_loss(model, examples: Sequence[Example], collate: Collator, batch_size: int,
                 autocast: Callable) -> float:
    """Mean cross-entropy per label token over ``examples``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size])
        batch = {k: v.to(_device(model)) for k, v in batch.items()}
        with autocast():
            loss, count = loss_sum(model, batch)
        total += float(loss)
        tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def split_prompt(example: Example, tokenizer) -> tuple[list[int], str]:
    """The tokens before the first answer, and the answer's text (without its end token)."""
    labels = example.labels
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX:
        end += 1
    answer = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=True)
    return example.input_ids[:start], answer.strip()


@dataclass
class ScoreResult:
    """Exact-match score of generated answers, with per-field numbers where the task has them."""

    n: int
    exact: float
    fields: dict[str, float] = field(default_factory=dict)
    samples: list[dict] = field(default_factory=list)
    """A few (prompt, prediction, reference) triples to show in the report."""

    def summary(self) -> str:
        parts = ", ".join(f"{k} {v:.1%}" for k, v in self.fields.items())
        return f"exact match {self.exact:.1%} of {self.n}" + (f" ({parts})" if parts else "")

    def as_dict(self) -> dict:
        return asdict(self)


def _task_api_score(predictions: list[str], references: list[str]) -> tuple[float, dict[str, float]]:
    from lorakit.data import task_api
    from lorakit.data.task_api.generate import FIELDS

    result = task_api.score(predictions, references)
    return result.exact, {name: getattr(result, name) for name in FIELDS}


def _exact_text(predictions: list[str], references: list[str]) -> tuple[float, dict[str, float]]:
    right = sum(p.strip() == r.strip() for p, r in zip(predictions, references))
    return right / max(len(predictions), 1), {}


SCORERS = {"task-api": _task_api_score, "exact": _exact_text}


def score_examples(model, tokenizer, examples: Sequence[Example], *, scorer: str, max_new_tokens: int,
                   batch_size: int = 32, autocast: Callable | None = None, keep_samples: int = 5) -> ScoreResult:
    """Greedy-generate an answer for each example's prompt and score it against the reference."""
    pairs = [split_prompt(e, tokenizer) for e in examples]
    # task-api answers are one line of JSON: a row can stop at its first line break
    predictions = generate_texts(model, tokenizer, [p for p, _ in pairs], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, autocast=autocast, one_line=scorer == "task-api")
    references = [r for _, r in pairs]
    exact, fields = SCORERS[scorer](predictions, references)
    samples = [{"prompt": tokenizer.decode(p, skip_special_tokens=False), "prediction": pred, "reference": ref}
               for (p, ref), pred in list(zip(pairs, predictions))[:keep_samples]]
    return ScoreResult(len(examples), exact, fields, samples)


def scorer_for(data: str) -> str:
    """task-api answers are scored field by field as JSON; anything else by exact text."""
    return "task-api" if data == "task-api" else "exact"


def evaluate_adapter(adapter_dir, *, model: str | None = None, data: str = "task-api", examples: int = 200,
                     max_new_tokens: int = 64, batch_size: int = 32) -> ScoreResult:
    """Score an adapter directory on held-out data: task-api's held-out split, or every record
    of a JSONL file."""
    from lorakit.data import load_data
    from lorakit.infer import load_adapted

    peft_model, tokenizer = load_adapted(adapter_dir, model=model)
    splits = load_data(data, tokenizer=tokenizer, max_length=None)
    heldout = splits.val if splits.val is not None else splits.train
    return score_examples(peft_model, tokenizer, list(heldout.examples)[:examples], scorer=scorer_for(data),
                          max_new_tokens=max_new_tokens, batch_size=batch_size)
