"""Score several adapters, and optionally their base model, on the same held-out examples.

The base model is loaded once; each adapter is loaded onto it by name and made active in turn
(``set_adapter``), and the base model is scored inside ``disable_adapter()``. Every model is
scored with the trainer's own evaluation (`lorakit.evaluation`: greedy generation, exact
match and per-field scores, held-out loss per answer token), so a column here equals
``lorakit eval`` of that adapter alone. Examples where the models' answers differ are kept with
each answer and whether it matched the reference.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from lorakit.data.collate import Collator
from lorakit.data.load import load_data
from lorakit.errors import ConfigError
from lorakit.evaluation import SCORERS, heldout_loss, line_breaks_for, score_examples, scorer_for, split_prompt
from lorakit.models.adapters import Adapters, adapter_pairs, base_model_for, load_adapted

__all__ = ["parse_adapter_specs", "compare_adapters", "Comparison", "ModelScore", "Disagreement", "BASE"]

BASE = "base"
"""The base model's column name (``include_base``); no adapter may take it then."""


def parse_adapter_specs(specs: Sequence[str], *, lone_dir: bool = False) -> list[tuple[str, Path]]:
    """``["A=runs/a/adapter", ...]`` -> ``[("A", Path("runs/a/adapter")), ...]``; malformed specs,
    bad names and repeated names are reported together in one ConfigError. ``lone_dir``: one
    bare ``DIR`` alone is accepted too, named "default" as PEFT names a lone adapter."""
    specs = list(specs or [])
    if lone_dir and len(specs) == 1 and "=" not in specs[0] and specs[0].strip():
        return [("default", Path(specs[0].strip()))]
    hint = "; a bare DIR works only for a lone adapter" if lone_dir else ""
    pairs, problems = [], []
    for spec in specs:
        name, sep, directory = spec.partition("=")
        if not sep or not name.strip() or not directory.strip():
            problems.append(f"{spec!r} is not NAME=DIR (write e.g. --adapter tuned=runs/x/adapter{hint})")
            continue
        pairs.append((name.strip(), Path(directory.strip())))
    if problems:
        raise ConfigError("--adapter: " + "; ".join(problems))
    return pairs


@dataclass
class ModelScore:
    """One column: an adapter's (or the base model's) scores on the shared examples."""

    name: str
    exact: float
    fields: dict[str, float]
    heldout_loss: float
    predictions: list[str] = field(repr=False)
    matched: list[bool] = field(repr=False)

    def as_dict(self) -> dict:
        return {"exact": self.exact, "fields": self.fields, "heldout_loss": self.heldout_loss,
                "matched": sum(self.matched)}


@dataclass
class Disagreement:
    """An example on which the models' answers differ."""

    source: str
    prompt: str
    reference: str
    outputs: dict[str, str]
    matched: dict[str, bool]


@dataclass
class Comparison:
    """The side-by-side result of `compare_adapters`."""

    data: str
    n: int
    base_model: str
    models: list[ModelScore]
    disagreements: list[Disagreement]

    def column(self, name: str) -> ModelScore:
        return next(m for m in self.models if m.name == name)

    def summary(self, show: int = 3) -> str:
        names = [m.name for m in self.models]
        width = max(12, *(len(n) + 2 for n in names))
        row = lambda label, cells: f"{label:<16}" + "".join(f"{c:>{width}}" for c in cells)
        lines = [f"{self.data}: {self.n} held-out examples, base model {self.base_model}", row("", names),
                 row("exact match", [f"{m.exact:.1%}" for m in self.models])]
        for key in self.models[0].fields:
            lines.append(row(f"  {key}", [f"{m.fields[key]:.1%}" for m in self.models]))
        lines.append(row("held-out loss", [f"{m.heldout_loss:.4f}" for m in self.models]))
        lines += ["", f"disagreements: {len(self.disagreements)} of {self.n} examples"
                  + (f"; the first {min(show, len(self.disagreements))}:" if self.disagreements and show else "")]
        for d in self.disagreements[:show]:
            lines.append(f"  {d.source}: {_tail(d.prompt)}")
            lines.append(f"    {'reference':<{width}} {d.reference}")
            for name in names:
                mark = "match" if d.matched[name] else "-"
                lines.append(f"    {name:<{width}} {mark:<6}{d.outputs[name]}")
        rest = len(self.disagreements) - show
        if rest > 0:
            lines.append(f"  ... and {rest} more (--show N prints more, --json prints all)")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"data": self.data, "examples": self.n, "base_model": self.base_model,
                "models": {m.name: m.as_dict() for m in self.models},
                "disagreement_count": len(self.disagreements),
                "disagreements": [d.__dict__ for d in self.disagreements]}


def _tail(prompt: str, chars: int = 100) -> str:
    """A prompt on one line, its end kept (where the question is)."""
    words = prompt.split()
    kept = []
    while words and len(" ".join(kept + words[-1:])) <= chars:
        kept.insert(0, words.pop())
    return " ".join(kept) if not words else "... " + " ".join(kept)


def compare_adapters(adapters: Adapters, *, include_base: bool = False, model: str | None = None,
                     data: str = "task-api", examples: int = 200, max_new_tokens: int = 64,
                     batch_size: int = 32) -> Comparison:
    """Score each named adapter (and with ``include_base`` the base model, as ``"base"``) on the
    first ``examples`` held-out examples of ``data`` (task-api's held-out split, or every record
    of a JSONL file), as ``lorakit eval`` does for one adapter.

    The adapters must name one base model (``base_model_name_or_path``); ``model`` overrides
    where it is loaded from.
    """
    pairs = adapter_pairs(adapters)
    if not pairs:
        raise ConfigError("compare needs at least one adapter (--adapter NAME=DIR)")
    reserved = {BASE: "is the base model's column with --include-base"} if include_base else None
    base_name = base_model_for(pairs, model, reserved)
    peft_model, tokenizer = load_adapted(pairs, model=base_name, reserved=reserved)

    splits = load_data(data, tokenizer=tokenizer, max_length=None)
    heldout = list((splits.val if splits.val is not None else splits.train).examples[:examples])
    scorer = scorer_for(data)
    collate = Collator(tokenizer.pad_token_id)
    columns = ([BASE] if include_base else []) + [name for name, _ in pairs]
    line_breaks = line_breaks_for(scorer, tokenizer)  # once for every column
    scores, samples = [], None
    for name in columns:
        if name == BASE:
            active = peft_model.disable_adapter()
        else:
            peft_model.set_adapter(name)
            active = contextlib.nullcontext()
        with active:
            result = score_examples(peft_model, tokenizer, heldout, scorer=scorer, max_new_tokens=max_new_tokens,
                                    batch_size=batch_size, keep_samples=len(heldout), line_breaks=line_breaks)
            loss = heldout_loss(peft_model, heldout, collate, batch_size, contextlib.nullcontext)
        samples = samples or result.samples
        predictions = [s["prediction"] for s in result.samples]
        matched = [SCORERS[scorer]([s["prediction"]], [s["reference"]])[0] == 1.0 for s in result.samples]
        scores.append(ModelScore(name, result.exact, result.fields, loss, predictions, matched))

    disagreements = []
    for i, sample in enumerate(samples or []):
        outputs = {m.name: m.predictions[i] for m in scores}
        if len(set(outputs.values())) > 1:
            prompt = tokenizer.decode(split_prompt(heldout[i], tokenizer)[0], skip_special_tokens=True)
            disagreements.append(Disagreement(heldout[i].source, prompt, sample["reference"], outputs,
                                              {m.name: m.matched[i] for m in scores}))
    return Comparison(str(data), len(heldout), str(base_name), scores, disagreements)
