"""`export_adapter`: one adapter into one of `FORMATS`, written as a directory, atomically.

Every format writes a new directory (a temporary beside it, renamed into place; an existing
non-empty one is replaced only with ``force``) and reports the files and the command that runs
them:

    gguf-adapter   adapter.gguf                      llama-cli -m BASE.gguf --lora OUT/adapter.gguf
    gguf           model-<outtype>.gguf (merged)     llama-cli -m OUT/model-<outtype>.gguf
    ollama         model.gguf (merged) + Modelfile,  ollama create NAME -f OUT/Modelfile
                   or with ``lora``: base.gguf + adapter.gguf + Modelfile
    vllm           the adapter's files, checked      vllm serve BASE --enable-lora --lora-modules NAME=OUT
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from lorakit.data.task_api.generate import SYSTEM as TASK_API_SYSTEM
from lorakit.errors import ConfigError
from lorakit.export.gguf_adapter import write_adapter_gguf
from lorakit.export.gguf_model import OUTTYPES, write_model_gguf
from lorakit.export.ollama import modelfile
from lorakit.export.vllm import write_for_vllm
from lorakit.infer.merge import check_out_dir, merge_into_base, write_atomically
from lorakit.models import base_model_for, load_model, load_tokenizer, resolve_model_dir
from lorakit.models.gguf import source_gguf

__all__ = ["FORMATS", "ExportReport", "export_adapter"]

FORMATS = ("gguf-adapter", "gguf", "ollama", "vllm")
_CONTEXT_CAP = 4096  # the Modelfile's num_ctx: the model's context, at most this (Ollama's memory grows with it)


@dataclass
class ExportReport:
    """What `export_adapter` wrote and how to run it."""

    format: str
    out_dir: str
    files: list[str]
    command: str
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"wrote {self.out_dir} ({self.format}): {', '.join(self.files)}", *self.notes,
                 f"run it: {self.command}"]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)


def _run_name(adapter_dir: Path) -> str:
    """A model name for Ollama and vLLM: the run's directory name for a run's adapter/, else the adapter's."""
    folder = adapter_dir.resolve()
    raw = folder.parent.name if folder.name == "adapter" else folder.name
    return re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-.") or "lorakit"


def _trained_system(adapter_dir: Path) -> str | None:
    """The system prompt of the data the adapter was trained on, when its run says (task-api's)."""
    config = adapter_dir.resolve().parent / "config.yaml"
    if not config.is_file():
        return None
    settings = yaml.safe_load(config.read_text())
    return TASK_API_SYSTEM if isinstance(settings, dict) and settings.get("data") == "task-api" else None


def _merged(adapter_dir: Path, model_dir: Path, notes: list[str]):
    """The base with the adapter merged in, fp32, as `lorakit merge` merges it, and its tokenizer."""
    merged = merge_into_base(adapter_dir, model_dir)
    if merged.untied:
        notes.append(f"untied from shared weights (the update applies to these only): {', '.join(merged.untied)}")
    if merged.quantized is not None:
        notes.append(merged.quantized.summary("fp32"))
    return merged.model.eval(), merged.tokenizer


def export_adapter(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, fmt: str, *,
                   model: str | None = None, outtype: str = "f16", name: str | None = None,
                   system: str | None = None, lora: bool = False, force: bool = False) -> ExportReport:
    """Write ``adapter_dir`` (a PEFT adapter directory) as ``fmt`` into the new directory ``out_dir``
    (see the module docstring). ``model``: the base (default: the adapter's); ``outtype``: a merged
    GGUF's tensor type; ``name`` and ``system``: Ollama's model name and system prompt (default:
    the run's name, and the system prompt of task-api for a task-api run); ``lora``: Ollama with the
    base and the adapter as two GGUF files instead of one merged file."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    if outtype not in OUTTYPES:
        raise ConfigError(f"--outtype {outtype!r}: use one of {', '.join(OUTTYPES)}")
    adapter_dir, out_dir = Path(adapter_dir), Path(out_dir)
    model_dir = resolve_model_dir(base_model_for(adapter_dir, model))
    check_out_dir(out_dir, force, protected=[adapter_dir, model_dir])
    name = name or _run_name(adapter_dir)
    notes: list[str] = []

    if fmt == "vllm":
        checks = []
        files = write_atomically(out_dir, lambda tmp: checks.append(write_for_vllm(adapter_dir, tmp)))
        check = checks[0]
        notes += check.warnings
        command = (f"vllm serve {model_dir} --enable-lora --lora-modules {name}={out_dir} "
                   f"--max-lora-rank {check.max_lora_rank}")
        return ExportReport(fmt, str(out_dir), files, command, notes)

    if fmt == "gguf-adapter":
        files = write_atomically(out_dir, lambda tmp: notes.extend(
            write_adapter_gguf(adapter_dir, tmp / "adapter.gguf", model=str(model_dir))))
        base = source_gguf(model_dir)
        if base is None:
            notes.append(f"llama.cpp needs the base model as a GGUF too: lorakit export --format gguf of the base, "
                         f"or llama.cpp's convert_hf_to_gguf.py {model_dir}")
        command = f"llama-cli -m {base or 'BASE.gguf'} --lora {out_dir / 'adapter.gguf'}"
        return ExportReport(fmt, str(out_dir), files, command, notes)

    if fmt == "gguf":
        merged, tokenizer = _merged(adapter_dir, model_dir, notes)
        filename = f"model-{outtype}.gguf"
        files = write_atomically(out_dir, lambda tmp: notes.extend(
            write_model_gguf(merged, tokenizer, model_dir, tmp / filename, outtype=outtype)))
        return ExportReport(fmt, str(out_dir), files, f"llama-cli -m {out_dir / filename}", notes)

    # ollama
    def write(tmp: Path) -> None:
        if lora:
            base = source_gguf(model_dir)
            if base is not None:
                shutil.copyfile(base, tmp / "base.gguf")
            else:
                plain, tokenizer = load_model(model_dir, dtype=torch.float32)
                notes.extend(write_model_gguf(plain, tokenizer, model_dir, tmp / "base.gguf", outtype=outtype))
            notes.extend(write_adapter_gguf(adapter_dir, tmp / "adapter.gguf", model=str(model_dir)))
            model_file, adapter_file = "base.gguf", "adapter.gguf"
        else:
            merged, tokenizer = _merged(adapter_dir, model_dir, notes)
            notes.extend(write_model_gguf(merged, tokenizer, model_dir, tmp / "model.gguf", outtype=outtype))
            model_file, adapter_file = "model.gguf", None
        template = load_tokenizer(model_dir).chat_template
        context = min(_context(model_dir), _CONTEXT_CAP)
        text, more = modelfile(model_file, adapter_file=adapter_file, chat_template=template,
                               system=system if system is not None else _trained_system(adapter_dir),
                               context=context, name=name)
        notes.extend(more)
        (tmp / "Modelfile").write_text(text)

    files = write_atomically(out_dir, write)
    return ExportReport(fmt, str(out_dir), files, f"ollama create {name} -f {out_dir / 'Modelfile'}", notes)


def _context(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 2048)
