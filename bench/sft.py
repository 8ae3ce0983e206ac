"""The whole fine-tuning job: `lorakit train` beside transformers `Trainer` + PEFT.

Both sides fine-tune the default model (SmolLM2-135M-Instruct) with the same LoRA adapter
(lorakit's `TrainConfig()` defaults: r, alpha, dropout, target modules) on the same tokenized
task-api examples (the seeded first-N subset lorakit's trainer picks), for the same number of
optimizer steps with the same hyperparameters: batch size, gradient accumulation, learning rate,
linear warm-up over ``warmup_steps(steps, warmup_ratio)`` steps, cosine decay to
``lr * min_lr_ratio``, weight decay, gradient clipping, seed. The peer is the usual recipe:
`peft.get_peft_model` on an fp32 model, `DataCollatorForSeq2Seq` padded batches, full logits, in
fp32 or with ``bf16=True`` (autocast). Each side runs in its own process, ``--rounds`` times in
turn (A B C, then C B A: this machine's speed drifts by tens of percent over minutes, and the
turns cancel a steady drift); for each it measures (times: the median over its rounds)

- wall time: the whole training process (start, imports, model and data loading, training, saved
  adapter; lorakit's also writes its run directory), measured by the parent; no scoring in it;
- training time: lorakit's summary ``train_seconds``; the Trainer's ``train_runtime``;
- real tokens (non-padding tokens of the batches trained on) and real tokens / training time;
  for the peer also the padded tokens it computed (sum over batches of rows x longest row);
- peak RSS of the process (``ru_maxrss``).

Then each adapter is judged identically, in its own process, by lorakit's scorer: the held-out
loss on ``--eval-examples`` and greedy exact match (and per-field scores) on ``--score-examples``
held-out examples, with the base model and autocast of lorakit's run precision. lorakit's run
itself scores nothing, evaluates no loss during training (one held-out example before and after)
and saves no checkpoints, as the peer. The schedules differ only as the libraries define them:
lorakit's warm-up starts at lr/warmup and its cosine reaches the floor at the last step; the
Trainer's starts at 0 and ends one step short of the floor.

    LORAKIT_CACHE=... .venv/bin/python bench/sft.py [--peers fp32,bf16] [--train-examples 1000]

prints a table with the ratios and writes ``--json`` (default bench/results/sft.json).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lorakit.train.config import TrainConfig
from machine import machine, write_result  # bench/machine.py

DEFAULTS = TrainConfig()
SHARED = ("train_examples", "eval_examples", "score_examples", "batch_size", "grad_accum", "lr", "epochs",
          "max_length", "seed", "precision")


def _train_config(args, **overrides) -> TrainConfig:
    values = dict(train_examples=args.train_examples, eval_examples=args.eval_examples,
                  score_examples=args.score_examples, batch_size=args.batch_size, grad_accum=args.grad_accum,
                  learning_rate=args.lr, epochs=args.epochs, max_length=args.max_length, seed=args.seed,
                  precision=args.precision)
    return TrainConfig.from_settings(**values | overrides)


def _splits(config: TrainConfig, tokenizer):
    """The data exactly as lorakit's trainer loads it (`_prepare` in train/loop.py)."""
    from lorakit.data import load_data

    return load_data(config.data, tokenizer=tokenizer, val=config.val_file, val_fraction=config.val_fraction,
                     seed=config.seed, max_length=config.max_length, overlong=config.overlong,
                     skip_bad_records=config.skip_bad_records)


def _train_subset(config: TrainConfig, examples: list) -> list:
    """The seeded first-N subset, picked as lorakit's `_prepare` picks it."""
    if config.train_examples is None or config.train_examples >= len(examples):
        return examples
    picked = sorted(random.Random(config.seed).sample(range(len(examples)), config.train_examples))
    return [examples[i] for i in picked]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _lorakit_worker(args) -> dict:
    from lorakit.train import train

    config = _train_config(args, run_dir=str(Path(args.workdir) / f"lorakit-run-{args.round}"), eval_every=0,
                           eval_examples=1,
                           score_examples=0, score_before=False, save_every=0)
    result = train(config)
    s = result.summary
    return {"adapter": str(result.adapter_dir), "precision": s["precision"], "steps": s["steps"],
            "train_seconds": s["train_seconds"], "real_tokens": s["tokens"],
            "padded_tokens": None, "final_loss": s["final_loss"], "peak_rss_mb": _peak_rss_mb(),
            "lora": {k: s[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "trainable")}}


def _trainer_worker(args) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.train.schedule import warmup_steps

    class CountingTrainer(Trainer):
        """Counts the real and padded tokens of each batch it trains on."""

        real_tokens = padded_tokens = 0

        def training_step(self, model, inputs, *rest, **kwargs):
            self.real_tokens += int(inputs["attention_mask"].sum())
            self.padded_tokens += inputs["input_ids"].numel()  # rows x longest row
            return super().training_step(model, inputs, *rest, **kwargs)

    config = _train_config(args)
    tokenizer = load_tokenizer(config.model)
    examples = _train_subset(config, list(_splits(config, tokenizer).train.examples))
    lora = config.lora
    model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(config.model), dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=sorted(lora.target_modules), use_rslora=lora.use_rslora, task_type="CAUSAL_LM"))
    out_dir = Path(args.workdir) / f"trainer-{args.peer_precision}-{args.round}"
    training_args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum, learning_rate=config.learning_rate,
        max_steps=args.steps,  # lorakit's own step count, so both take the same optimizer steps
        warmup_steps=warmup_steps(args.steps, config.warmup_ratio), lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio}, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, bf16=args.peer_precision == "bf16",
        use_cpu=not torch.cuda.is_available(), save_strategy="no", report_to=[], logging_steps=config.log_every,
        label_names=["labels"], disable_tqdm=True)
    dataset = [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    trainer = CountingTrainer(
        model=model, args=training_args, train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    output = trainer.train()
    model.save_pretrained(out_dir / "adapter")
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"adapter": str(out_dir / "adapter"), "precision": args.peer_precision, "steps": output.global_step,
            "train_seconds": output.metrics["train_runtime"],
            "real_tokens": trainer.real_tokens, "padded_tokens": trainer.padded_tokens,
            "final_loss": losses[-1] if losses else None, "peak_rss_mb": _peak_rss_mb()}


def _score_worker(args) -> dict:
    """Held-out loss and task score of one adapter, as lorakit's trainer measures its own."""
    import torch

    from lorakit import PeftModel
    from lorakit.data import Collator
    from lorakit.models import load_model
    from lorakit.evaluation import heldout_loss, score_examples, scorer_for
    from lorakit.train.setup import autocast_for

    config = _train_config(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base, tokenizer = load_model(config.model, device=device,
                                 dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
    model = PeftModel.from_pretrained(base, args.adapter)
    heldout = list(_splits(config, tokenizer).val.examples)
    autocast = autocast_for(args.precision, device)
    loss = heldout_loss(model, heldout[: config.eval_examples], Collator(tokenizer.pad_token_id),
                        config.batch_size, autocast)
    result = score_examples(model, tokenizer, heldout[: config.score_examples], scorer=scorer_for(config.data),
                            max_new_tokens=config.max_new_tokens, autocast=autocast)
    return {"heldout_loss": loss, "exact": result.exact, "fields": result.fields, "scored": result.n}


WORKERS = {"lorakit": _lorakit_worker, "trainer": _trainer_worker, "score": _score_worker}


def _spawn(args, name: str, kind: str, *extra: str) -> tuple[dict, float]:
    """Run one worker in its own process: (its JSON result, the process's wall seconds)."""
    out = Path(args.workdir) / f"{name}.json"
    flags = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in SHARED]
    command = [sys.executable, __file__, "--worker", kind, "--workdir", args.workdir, "--out", str(out), *flags, *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return json.loads(out.read_text()), time.perf_counter() - started


def _train_side(args, name: str, kind: str, *extra: str) -> dict:
    result, seconds = _spawn(args, name, kind, *extra)
    return result | {"wall_seconds": seconds}


def _combine(runs: list[dict]) -> dict:
    """One side over its rounds: the first round's adapter (the one scored), the median training
    and wall time, the largest peak RSS, and every round's times."""
    side = dict(runs[0])
    side["train_seconds"] = statistics.median(r["train_seconds"] for r in runs)
    side["wall_seconds"] = statistics.median(r["wall_seconds"] for r in runs)
    side["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    side["rounds"] = [{k: r[k] for k in ("train_seconds", "wall_seconds", "peak_rss_mb", "final_loss")} for r in runs]
    return side


def _table(sides: dict[str, dict]) -> str:
    head = f"{'side':<14}{'wall s':>9}{'train s':>9}{'real tok':>10}{'tok/s':>8}{'padded tok':>11}" \
           f"{'RSS MB':>8}{'exact':>7}{'loss':>7}  fields"
    rows = [head, "-" * len(head)]
    for name, s in sides.items():
        padded = f"{s['padded_tokens']:,}" if s["padded_tokens"] is not None else "-"
        fields = " ".join(f"{k} {v:.0%}" for k, v in s["fields"].items())
        rows.append(f"{name:<14}{s['wall_seconds']:>9.1f}{s['train_seconds']:>9.1f}{s['real_tokens']:>10,}"
                    f"{s['tokens_per_second']:>8.0f}{padded:>11}{s['peak_rss_mb']:>8.0f}{s['exact']:>7.1%}"
                    f"{s['heldout_loss']:>7.3f}  {fields}")
    lk = sides["lorakit"]
    for name, s in sides.items():
        if name != "lorakit":
            rows.append(f"lorakit vs {name}: real tokens/s {lk['tokens_per_second'] / s['tokens_per_second']:.2f}x "
                        f"(lorakit/peer), wall time {lk['wall_seconds'] / s['wall_seconds']:.2f}x (lorakit/peer)")
    return "\n".join(rows)


def _parent(args) -> None:
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in ("fp32", "bf16")]
    if unknown:
        sys.exit(f"--peers {args.peers}: unknown precision(s) {unknown}; use fp32 and/or bf16, e.g. --peers fp32,bf16")
    keep = args.workdir is not None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="lorakit-sft-")
    try:
        order = ["lorakit"] + [f"trainer-{peer}" for peer in peers]
        runs: dict[str, list[dict]] = {name: [] for name in order}
        steps = None
        for r in range(args.rounds):  # this machine drifts: the rounds run the sides in turn, A B C C B A ...
            for name in order if r % 2 == 0 else order[::-1]:
                if name == "lorakit":
                    runs[name].append(_train_side(args, f"{name}-{r}", "lorakit", f"--round={r}"))
                    steps = runs[name][-1]["steps"]
                else:
                    runs[name].append(_train_side(args, f"{name}-{r}", "trainer", f"--peer-precision={name[8:]}",
                                                  f"--steps={steps}", f"--round={r}"))
        sides = {name: _combine(runs[name]) for name in order}
        precision = sides["lorakit"]["precision"]
        for name, side in sides.items():  # every adapter judged in lorakit's run precision
            score, _ = _spawn(args, f"score-{name}", "score", f"--adapter={side['adapter']}",
                              f"--score-precision={precision}")
            side.update(score)
            side["tokens_per_second"] = side["real_tokens"] / side["train_seconds"]
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    problems = [f"{name}: {s['steps']} steps, {s['real_tokens']:,} real tokens" for name, s in sides.items()
                if (s["steps"], s["real_tokens"]) != (steps, sides["lorakit"]["real_tokens"])]
    print()
    print(_table(sides))
    if problems:
        print(f"WARNING: the sides did not train on the same tokens (lorakit: {steps} steps, "
              f"{sides['lorakit']['real_tokens']:,} real tokens): " + "; ".join(problems))
    result = {"benchmark": "sft", "command": [sys.executable, *sys.argv], "machine": machine(),
              "settings": {name: getattr(args, name) for name in SHARED} | {"peers": peers, "steps": steps,
                                                                           "rounds": args.rounds,
                                                                           "scored_in": precision},
              "sides": sides}
    write_result(args.json, result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default="fp32,bf16", help="Trainer + PEFT precisions to run: fp32, bf16 or both")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=200, help="held-out examples for the loss")
    p.add_argument("--score-examples", type=int, default=200, help="held-out examples scored by generation")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--grad-accum", type=int, default=DEFAULTS.grad_accum)
    p.add_argument("--lr", type=float, default=1e-3, help="default 1e-3, as `make demo`")
    p.add_argument("--epochs", type=float, default=DEFAULTS.epochs)
    p.add_argument("--max-length", type=int, default=DEFAULTS.max_length)
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--precision", default=DEFAULTS.precision, help="lorakit's precision: auto, fp32 or bf16")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "sft.json"))
    p.add_argument("--workdir", default=None, help="keep the runs and adapters here (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=2,
                   help="train every side this many times, in turn (A B C C B A ...); times are medians")
    # internal: one side of the comparison, run by the parent in its own process
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    p.add_argument("--peer-precision", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--adapter", help=argparse.SUPPRESS)
    p.add_argument("--score-precision", choices=("fp32", "bf16"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        _parent(args)
        return
    if args.worker == "score":
        args.precision = args.score_precision
    Path(args.out).write_text(json.dumps(WORKERS[args.worker](args)))


if __name__ == "__main__":
    main()
