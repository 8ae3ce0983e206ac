"""The LoRA variants side by side: each trained by `lorakit train` on task-api with the same budget.

Every variant trains the default model (SmolLM2-135M-Instruct) on the same seeded task-api
examples, for the same number of optimizer steps, with the same batch, learning rate, schedule and
seed; only the adapter (or the optimizer, for LoRA+) differs, as listed in `VARIANTS`. Each runs in
its own process through the trainer's Python API (`lorakit.train.train`) and records

- held-out exact match: the trainer's own score after training (greedy generation on
  ``--score-examples`` held-out examples);
- held-out loss after training (on ``--eval-examples`` held-out examples);
- training time (the run summary's ``train_seconds``) and the process's wall time;
- trainable parameters, and the size of the saved ``adapter_model.safetensors`` (PiSSA and OLoRA
  runs save a plain LoRA adapter of rank 2r for the original base, so twice the size).

A variant this lorakit cannot build (a field or option it does not have yet) is listed as
skipped, with the reason, instead of stopping the others.

    .venv/bin/python bench/variants.py [--variants lora,dora,...] [--train-examples 1000]
    .venv/bin/python bench/variants.py --write-docs docs/VARIANTS.md

prints a markdown table and writes ``--json`` (default bench/results/variants.json); with
``--write-docs`` also puts the table, the machine and the command into that document.
(smoke test: ``--train-examples 16 --max-steps 2 --eval-examples 4 --score-examples 4``)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig
from machine import machine, write_result  # bench/machine.py

DEFAULTS = TrainConfig()

# name -> TrainConfig fields that make the variant (over the shared settings). Add a line to add
# a variant; the first one is the baseline the others are compared to.
VARIANTS: dict[str, dict] = {
    "lora": {},
    "gaussian": {"init_lora_weights": "gaussian"},
    "pissa": {"init_lora_weights": "pissa"},
    "olora": {"init_lora_weights": "olora"},
    "dora": {"use_dora": True},
    "loraplus-16": {"loraplus_ratio": 16},
    "lora-r64": {"r": 64, "lora_alpha": 16},
    "rslora-r64": {"r": 64, "lora_alpha": 16, "use_rslora": True},
    "adalora": {"method": "adalora"},
}

SHARED = ("model", "train_examples", "eval_examples", "score_examples", "batch_size", "grad_accum", "lr", "epochs",
          "max_steps", "max_length", "seed", "precision")

DOC_START, DOC_END = "<!-- bench/variants.py: start -->", "<!-- bench/variants.py: end -->"


def _train_config(args, variant: str, **overrides) -> TrainConfig:
    """The shared budget plus the variant's fields (raises ConfigError / TypeError if this lorakit
    cannot build it)."""
    values = dict(model=args.model, train_examples=args.train_examples, eval_examples=args.eval_examples,
                  score_examples=args.score_examples, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  learning_rate=args.lr, epochs=args.epochs, max_steps=args.max_steps, max_length=args.max_length,
                  seed=args.seed, precision=args.precision, name=variant)
    config = TrainConfig.from_settings(**values | VARIANTS[variant] | overrides)  # the adapter validated too
    return config


def _variant_worker(args) -> dict:
    from lorakit.train import train

    config = _train_config(args, args.variant, run_dir=str(Path(args.workdir) / args.variant), eval_every=0,
                           score_before=False, save_every=0)
    result = train(config, progress=False)
    s = result.summary
    adapter_file = result.adapter_dir / "adapter_model.safetensors"
    return {"variant": s.get("variant"), "fields": VARIANTS[args.variant], "steps": s["steps"],
            "train_seconds": s["train_seconds"], "tokens": s["tokens"], "final_loss": s["final_loss"],
            "heldout_loss": s["heldout_after"], "exact": (result.score_after or {}).get("exact"),
            "scored": (result.score_after or {}).get("n"), "trainable": s["trainable"], "r": s["r"],
            "lora_alpha": s["lora_alpha"], "adapter_bytes": adapter_file.stat().st_size}


def _run_variant(args, name: str) -> dict:
    """One variant in its own process: its result, with the process's wall seconds."""
    out = Path(args.workdir) / f"{name}.json"
    flags = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in SHARED if getattr(args, flag) is not None]
    command = [sys.executable, __file__, "--worker", "--variant", name, "--workdir", args.workdir,
               "--out", str(out), *flags]
    started = time.perf_counter()
    proc = subprocess.run(command)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"failed": f"exit status {proc.returncode} (its output is above)", "wall_seconds": wall}
    return json.loads(out.read_text()) | {"wall_seconds": wall}


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(results: dict[str, dict]) -> str:
    """The markdown table of ``results`` (variant name -> result)."""
    rows = ["| variant | settings | exact match | held-out loss | train s | trainable params | adapter MB |",
            "|---|---|---|---|---|---|---|"]
    for name, s in results.items():
        settings = ", ".join(f"{k}={v}" for k, v in VARIANTS.get(name, {}).items()) or "defaults"
        if "skipped" in s or "failed" in s:
            rows.append(f"| {name} | {settings} | {s.get('skipped') or s.get('failed')} | | | | |")
            continue
        rows.append(f"| {name} | {settings} | {_cell(s['exact'], '.1%')} | {_cell(s['heldout_loss'], '.4f')} | "
                    f"{s['train_seconds']:.1f} | {s['trainable']:,} | {s['adapter_bytes'] / 1e6:.2f} |")
    return "\n".join(rows)


def write_docs(path: Path, text: str) -> None:
    """Put ``text`` between the bench's markers in ``path`` (the rest of the document is kept)."""
    block = f"{DOC_START}\n{text}\n{DOC_END}"
    if path.exists() and DOC_START in path.read_text():
        old = path.read_text()
        before, rest = old.split(DOC_START, 1)
        after = rest.split(DOC_END, 1)[1] if DOC_END in rest else ""
        path.write_text(before + block + after)
        return
    head = "# LoRA variants compared\n\nWritten by `bench/variants.py`; rerun it to refresh the table.\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((path.read_text() + "\n\n" if path.exists() else head) + block + "\n")


def _docs_text(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    budget = (f"{s['max_steps']} optimizer steps" if s["max_steps"] else f"{s['epochs']:g} epoch(s)") + \
        f" of {s['train_examples']} task-api examples, batch {s['batch_size']} x {s['grad_accum']}, lr {s['lr']:g}, " \
        f"seed {s['seed']}, precision {s['precision']}"
    return "\n".join([
        f"Each variant: `{s['model']}`, {budget}; exact match on {s['score_examples']} held-out examples, "
        f"held-out loss on {s['eval_examples']}.",
        "",
        table(result["variants"]),
        "",
        "PiSSA and OLoRA adapters are saved as the trainer saves them: converted to plain LoRA adapters of rank "
        "2r for the original base model, hence twice the file size. LoRA+ trains B at lr x 16, A at lr.",
        "",
        f"Machine: {m['cpu']} ({m['cores']} cores){', GPU ' + m['gpu'] if m['gpu'] else ''}, {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, lorakit {m['lorakit']}.",
        "",
        f"Command: `{' '.join(result['command'])}`",
    ])


def _parent(args) -> None:
    names = list(VARIANTS) if args.variants is None else [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        sys.exit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    keep = args.workdir is not None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="lorakit-variants-")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    try:
        for name in names:
            try:
                _train_config(args, name)
            except (LorakitError, TypeError) as err:  # a field or option this lorakit does not have
                results[name] = {"skipped": "not available: " + " ".join(str(err).split())}
                print(f"{name}: skipped ({results[name]['skipped']})", flush=True)
                continue
            print(f"{name}: training ...", flush=True)
            results[name] = _run_variant(args, name)
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    trained = [s for s in results.values() if "steps" in s]
    if len({(s["steps"], s["tokens"]) for s in trained}) > 1:
        print("WARNING: the variants did not train on the same tokens: "
              + "; ".join(f"{n}: {s['steps']} steps, {s['tokens']:,} tokens" for n, s in results.items() if "steps" in s))
    result = {"benchmark": "variants", "command": [Path(sys.executable).name, *sys.argv], "machine": machine(),
              "settings": {name: getattr(args, name) for name in SHARED}, "variants": results}
    print()
    print(table(results))
    write_result(args.json, result)
    if args.write_docs:
        write_docs(Path(args.write_docs), _docs_text(result))
        print(f"wrote {args.write_docs}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=None, help=f"comma-separated subset of: {', '.join(VARIANTS)} (default: all)")
    p.add_argument("--model", default=DEFAULTS.model, help="the base model (default: the embedded SmolLM2-135M)")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples for the loss")
    p.add_argument("--score-examples", type=int, default=200, help="held-out examples scored by generation")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum)
    p.add_argument("--lr", type=float, default=1e-3, help="default 1e-3, as bench/sft.py and `make demo`")
    p.add_argument("--epochs", type=float, default=DEFAULTS.epochs)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    p.add_argument("--max-length", type=int, default=DEFAULTS.max_length)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--precision", default=DEFAULTS.precision, help="auto, fp32 or bf16")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "variants.json"))
    p.add_argument("--write-docs", default=None, metavar="PATH", help="also write the table into this document")
    p.add_argument("--workdir", default=None, help="keep the runs and adapters here (default: a temporary directory)")
    # internal: one variant, run by the parent in its own process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker:
        _parent(args)
        return
    Path(args.out).write_text(json.dumps(_variant_worker(args)))


if __name__ == "__main__":
    main()
