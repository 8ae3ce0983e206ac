"""`lorakit.speedup` inside transformers' Trainer (and TRL's SFTTrainer), beside PEFT, in one run.

Every side trains the same model (--model, default SmolLM2-135M-Instruct) with the same LoRA adapter
(r=--rank, alpha=2r, dropout 0, all seven projections) on the same tokenized task-api examples
(`lorakit.data`, labels on the answers only; the seeded first --train-examples), the same batches
(--collator: "packed", transformers' `DataCollatorWithFlattening`, or "padded"), the same optimizer
steps and hyperparameters (AdamW, --lr, linear decay, no warm-up), gradient checkpointing off.
The sides, each in its own process, --rounds times in turn (A B C, then C B A: the machine drifts):

  lorakit    lorakit's get_peft_model + `lorakit.speedup(model)`: bf16 frozen weights with fp32
             adapters where the hardware multiplies bf16 natively, else fp32 (resolve_precision);
             the Trainer's own bf16 off
  peft-fp32  peft.get_peft_model on the fp32 model, the Trainer in fp32
  peft-bf16  the same with the Trainer's ``bf16=True`` (autocast; PEFT's best setting)

and, where TRL is installed (--loops trainer,sft), the same three under TRL's SFTTrainer
(``padding_free=True`` for packed batches; TRL computes the loss with its own fused LM head on every
side). Every transformers model is told ``use_cache=False``: without it, transformers' own attention
lets the examples of a packed row see each other. For each side it measures

- real tokens/s: the non-padding tokens of the batches trained on over the Trainer's
  ``train_runtime`` (all steps), and over the steps after the first (steady: no warm-up);
- peak memory: the process's peak RSS, and on a GPU ``torch.cuda.max_memory_allocated``;
- the held-out loss after training: the saved adapter loaded by lorakit onto the fp32 base model,
  mean cross-entropy per answer token over --eval-examples held-out examples, the same for every side.

    python bench/trainer_speedup.py                              # the benchmark (an idle machine)
    OMP_NUM_THREADS=1 python bench/trainer_speedup.py --train-examples 8 --eval-examples 4 --steps 2 \\
        --batch-size 2 --max-length 128 --rounds 1 --json /tmp/trainer_speedup.json       # smoke test

prints a table with the ratios and writes --json (default bench/results/trainer_speedup.json).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine, write_result  # bench/machine.py

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SIDES = ("lorakit", "lorakit-fp32", "peft-fp32", "peft-bf16")
"""lorakit + speedup (bf16 where the machine runs it natively), lorakit + speedup(bf16=False), PEFT in
fp32, PEFT under the Trainer's bf16 autocast."""
SHARED = ("model", "train_examples", "eval_examples", "batch_size", "grad_accum", "steps", "lr", "rank",
          "max_length", "seed", "collator")


def _examples(args):
    """(training examples, held-out examples, tokenizer): the same for every side."""
    from lorakit.data import load_data
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    splits = load_data("task-api", tokenizer=tokenizer, max_length=args.max_length, seed=args.seed)
    train = list(splits.train.examples)
    if args.train_examples < len(train):
        picked = sorted(random.Random(args.seed).sample(range(len(train)), args.train_examples))
        train = [train[i] for i in picked]
    heldout = list(splits.val.examples)[: args.eval_examples] if splits.val is not None else []
    return train, heldout, tokenizer


def _model(args, side: str, device):
    import torch

    from lorakit.models import load_model

    base, _ = load_model(args.model, device=device)
    base.config.use_cache = False  # a packed row's examples stay apart in transformers' attention only so
    torch.manual_seed(args.seed)
    if side.startswith("lorakit"):
        import lorakit

        model = lorakit.get_peft_model(base, lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                                                 lora_dropout=0.0, target_modules=TARGETS))
        return lorakit.speedup(model, bf16=False if side == "lorakit-fp32" else None)
    import peft

    return peft.get_peft_model(base, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                     target_modules=TARGETS, task_type="CAUSAL_LM"))


def _collator(args, tokenizer):
    if args.collator == "packed":
        from transformers import DataCollatorWithFlattening

        return DataCollatorWithFlattening()
    from transformers import DataCollatorForSeq2Seq

    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)


def _counting(trainer_class):
    """``trainer_class`` that counts the real tokens of the batches it trains on, and times each step."""

    class Counting(trainer_class):
        step_times: list[float] = []
        step_tokens: list[int] = []

        def training_step(self, model, inputs, *rest, **kwargs):
            import torch

            mask = inputs.get("attention_mask")
            self.step_tokens.append(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
            started = time.perf_counter()
            loss = super().training_step(model, inputs, *rest, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.step_times.append(time.perf_counter() - started)  # micro-batches: forward and backward
            return loss

    return Counting


def _heldout_loss(args, adapter: Path, heldout) -> float:
    """The adapter loaded by lorakit onto the fp32 base model: mean cross-entropy per answer token."""
    import contextlib

    from lorakit import PeftModel
    from lorakit.data import Collator
    from lorakit.evaluation import heldout_loss
    from lorakit.models import load_model

    base, tokenizer = load_model(args.model)
    model = PeftModel.from_pretrained(base, str(adapter))
    return heldout_loss(model, heldout, Collator(tokenizer.pad_token_id), args.batch_size, contextlib.nullcontext)


def _worker(args) -> dict:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train, heldout, tokenizer = _examples(args)
    model = _model(args, args.side, device)
    out_dir = Path(args.workdir) / f"{args.loop}-{args.side}-{args.round}"
    common = dict(output_dir=str(out_dir), per_device_train_batch_size=args.batch_size,
                  gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, max_steps=args.steps,
                  lr_scheduler_type="linear", warmup_steps=0, seed=args.seed, bf16=args.side == "peft-bf16",
                  use_cpu=device.type == "cpu", save_strategy="no", report_to=[], logging_steps=1,
                  disable_tqdm=True, gradient_checkpointing=False)
    data = [{"input_ids": e.input_ids, "labels": e.labels} for e in train]
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if args.loop == "trainer":
        from transformers import Trainer, TrainingArguments

        trainer = _counting(Trainer)(model=model, args=TrainingArguments(**common), train_dataset=data,
                                     data_collator=_collator(args, tokenizer))
    else:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        sft = SFTConfig(**common, padding_free=args.collator == "packed", max_length=None)
        # TRL recognises PEFT's PeftModel only: lorakit's goes in as the transformers model holding its layers
        given = model.get_base_model() if args.side.startswith("lorakit") else model
        trainer = _counting(SFTTrainer)(model=given, args=sft, train_dataset=Dataset.from_list(data),
                                        processing_class=tokenizer)
        if args.side.startswith("lorakit"):  # after the trainer's fused LM head: served on the label positions
            import lorakit

            lorakit.speedup(model, bf16=False if args.side == "lorakit-fp32" else None, verbose=False)
    output = trainer.train()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda_mb = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    model.save_pretrained(out_dir / "adapter")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    first = args.grad_accum  # the micro-batches of the first optimizer step: warm-up
    steady = sum(trainer.step_times[first:])
    return {"side": args.side, "loop": args.loop, "steps": output.global_step,
            "notes": getattr(model, "lorakit_speedup", None), "train_seconds": output.metrics["train_runtime"],
            "real_tokens": sum(trainer.step_tokens), "micro_batch_seconds": trainer.step_times,
            "steady_tokens_per_second": sum(trainer.step_tokens[first:]) / steady if steady > 0 else None,
            "final_train_loss": losses[-1] if losses else None, "peak_rss_mb": rss_mb, "cuda_peak_mb": cuda_mb,
            "heldout_loss": _heldout_loss(args, out_dir / "adapter", heldout) if heldout else None}


def _spawn(args, name: str, *extra: str) -> dict:
    out = Path(args.workdir) / f"{name}.json"
    flags = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in SHARED]
    command = [sys.executable, __file__, "--worker", "--workdir", args.workdir, "--out", str(out), *flags, *extra]
    subprocess.run(command, check=True)
    return json.loads(out.read_text())


def _combine(runs: list[dict]) -> dict:
    side = dict(runs[0])
    side["train_seconds"] = statistics.median(r["train_seconds"] for r in runs)
    steady = [r["steady_tokens_per_second"] for r in runs if r["steady_tokens_per_second"]]
    side["steady_tokens_per_second"] = statistics.median(steady) if steady else None
    side["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    cuda = [r["cuda_peak_mb"] for r in runs if r["cuda_peak_mb"] is not None]
    side["cuda_peak_mb"] = max(cuda) if cuda else None
    side["tokens_per_second"] = side["real_tokens"] / side["train_seconds"]
    side["rounds"] = [{k: r[k] for k in ("train_seconds", "steady_tokens_per_second", "peak_rss_mb",
                                         "final_train_loss")} for r in runs]
    return side


def _table(loop: str, sides: dict[str, dict]) -> str:
    gpu = any(s["cuda_peak_mb"] is not None for s in sides.values())
    head = f"{loop + ' / side':<20}{'real tok':>10}{'tok/s':>9}{'steady':>9}{'vs fp32':>9}{'vs bf16':>9}" \
           f"{'RSS MB':>8}{'GPU MB' if gpu else '':>8}{'heldout':>9}{'train loss':>11}"
    rows = [head, "-" * len(head)]
    for name, s in sides.items():
        ratio = {peer: s["tokens_per_second"] / sides[peer]["tokens_per_second"] if peer in sides else float("nan")
                 for peer in ("peft-fp32", "peft-bf16")}
        steady = f"{s['steady_tokens_per_second']:.0f}" if s["steady_tokens_per_second"] else "-"
        cuda = f"{s['cuda_peak_mb']:.0f}" if s["cuda_peak_mb"] is not None else ""
        heldout = f"{s['heldout_loss']:.4f}" if s["heldout_loss"] is not None else "-"
        rows.append(f"{name:<20}{s['real_tokens']:>10,}{s['tokens_per_second']:>9.1f}{steady:>9}"
                    f"{ratio['peft-fp32']:>8.2f}x{ratio['peft-bf16']:>8.2f}x{s['peak_rss_mb']:>8.0f}{cuda:>8}"
                    f"{heldout:>9}{s['final_train_loss']:>11.4f}")
    return "\n".join(rows)


def _parent(args) -> None:
    loops = [loop for loop in args.loops.split(",") if loop]
    if "sft" in loops and importlib.util.find_spec("trl") is None:
        print("TRL is not installed: the SFTTrainer sides are left out (pip install trl)")
        loops.remove("sft")
    keep = args.workdir is not None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="lorakit-trainer-speedup-")
    results = {}
    for loop in loops:
        order = [f"{loop}:{side}" for side in args.sides.split(",") if side]
        runs: dict[str, list[dict]] = {name: [] for name in order}
        for r in range(args.rounds):  # the sides in turn: A B C, then C B A
            for name in order if r % 2 == 0 else order[::-1]:
                runs[name].append(_spawn(args, f"{name.replace(':', '-')}-{r}", f"--loop={loop}",
                                         f"--side={name.split(':')[1]}", f"--round={r}"))
        sides = {name.split(":")[1]: _combine(runs[name]) for name in order}
        tokens = {s["real_tokens"] for s in sides.values()}
        print()
        print(_table(loop, sides))
        if len(tokens) > 1:
            print(f"WARNING: the sides did not train on the same tokens: {sorted(tokens)}")
        for name in (n for n in sides if n.startswith("lorakit")):
            print(f"{name}'s speedup: {'; '.join(sides[name]['notes'] or [])}")
        results[loop] = sides
    if not keep:
        import shutil

        shutil.rmtree(args.workdir, ignore_errors=True)
    result = {"benchmark": "trainer_speedup", "command": [sys.executable, *sys.argv], "machine": machine(),
              "settings": {name: getattr(args, name) for name in SHARED} | {"rounds": args.rounds, "loops": loops},
              "loops": results}
    write_result(args.json, result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help="an embedded name, a .gguf or a model directory")
    p.add_argument("--loops", default="trainer,sft", help="trainer (transformers' Trainer) and/or sft (TRL's)")
    p.add_argument("--train-examples", type=int, default=512)
    p.add_argument("--eval-examples", type=int, default=100, help="held-out examples for the loss after training")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps, the same for every side")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--collator", choices=("packed", "padded"), default="packed",
                   help="packed: DataCollatorWithFlattening (SFTTrainer: padding_free); padded: DataCollatorForSeq2Seq")
    p.add_argument("--sides", default=",".join(SIDES), help=f"which of {', '.join(SIDES)} to train")
    p.add_argument("--rounds", type=int, default=2, help="train every side this many times, in turn")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "trainer_speedup.json"))
    p.add_argument("--workdir", default=None, help="keep the runs and adapters here (default: a temporary directory)")
    # internal: one side, run by the parent in its own process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--loop", choices=("trainer", "sft"), default="trainer", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=SIDES, default="lorakit", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sides.split(",")) - set(SIDES) - {""}
    if unknown:
        p.error(f"--sides: unknown {sorted(unknown)}; choose from {', '.join(SIDES)}")
    if not args.worker:
        _parent(args)
        return
    Path(args.out).write_text(json.dumps(_worker(args)))


if __name__ == "__main__":
    main()
