"""DPO training: `lorakit train --method dpo` beside TRL's `DPOTrainer` + PEFT.

Both sides train the default model (SmolLM2-135M-Instruct, loaded by lorakit's loader, so the
weights are identical) with the same LoRA adapter (lorakit's `TrainConfig()` defaults: r, alpha,
dropout, target modules) by DPO (sigmoid loss, beta 0.1, the reference being the model as it
started: lorakit disables the adapter, TRL 1.x runs a frozen copy of the fresh adapter, which is
the same function) on the same task-api-prefs pairs (the seeded ``--train-examples`` subset of the
training pairs lorakit's trainer picks, TRL given them as conversational prompt / chosen /
rejected records), for the same number of optimizer steps with the same batch size, learning rate,
linear warm-up over ``warmup_steps(steps, warmup_ratio)`` steps, cosine decay to
``lr * min_lr_ratio``, weight decay, gradient clipping and seed. The defaults (256 pairs, batch 8,
32 steps) are one epoch, so both sides see every pair once, in their own orders. TRL runs as
usual: `peft.get_peft_model` on an fp32 model, `DataCollatorForPreference` padded batches (the
chosen and rejected rows of each pair, its prompt in both; TRL's own chunked log-probability
output head), in fp32 (``trl-fp32``) or with ``bf16=True`` (``trl-bf16``: autocast); gradient
checkpointing off on both sides. lorakit runs in its ``--precision`` (auto: bf16 where the CPU
multiplies bf16 natively, the frozen base stored in bf16) with its own batching (each pair's
prompt computed once for both answers where its attention allows). The schedules differ only as
the libraries define them: lorakit's warm-up starts at lr/warmup, the Trainer's at 0 (its first
step changes nothing).

Each side runs in its own process, ``--rounds`` times in turn (A B C, then C B A: this machine's
speed drifts by tens of percent over minutes, and the turns cancel a steady drift); for each it
measures (times: the median over its rounds)

- wall time: the whole training process (start, imports, model and data loading, tokenizing,
  training; lorakit's also writes its run directory and adapter), measured by the parent;
- training time: lorakit's summary ``train_seconds`` (the sum of its optimizer steps);
  the Trainer's ``train_runtime`` (``trainer.train()``);
- real tokens: the tokens of prompt + chosen and prompt + rejected of every pair trained on
  (each prompt counted twice, padding not counted): lorakit's summary ``tokens``; for TRL the sum
  of ``attention_mask`` over the batches its ``training_step`` took (TRL keeps the newline the
  chat template writes after each answer's end-of-turn token, lorakit does not: one token more per
  sequence), and the padded positions it computed (rows x longest row per batch);
- real tokens / training time, and the ratios lorakit / TRL;
- peak RSS of the process (``ru_maxrss``: model loading included);
- the final training loss (DPO loss per pair) and reward accuracy (chosen rewarded above
  rejected), both the mean over the last ``--log-every`` steps (lorakit's last ``train`` record in
  its metrics.jsonl; TRL's last ``loss`` / ``rewards/accuracies`` in its log history).

lorakit's run evaluates the loss of one held-out pair (outside ``train_seconds``),
scores nothing and saves no checkpoints; TRL evaluates nothing and saves nothing.

    LORAKIT_CACHE=... OMP_NUM_THREADS=... .venv/bin/python bench/dpo.py [--peers fp32,bf16] [--steps 32]

prints a table with the ratios and writes ``--json`` (default bench/results/dpo.json). Smoke test:

    .venv/bin/python bench/dpo.py --train-examples 8 --steps 2 --batch 4 --rounds 1 --json /tmp/dpo-smoke.json
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
SHARED = ("train_examples", "steps", "batch", "lr", "beta", "max_length", "log_every", "seed", "precision")
DATA = "task-api-prefs"


def _log_every(args) -> int:
    return max(1, min(args.log_every, args.steps))


def _train_config(args, **overrides) -> TrainConfig:
    values = dict(method="dpo", data=DATA, train_examples=args.train_examples, max_steps=args.steps,
                  batch_size=args.batch, learning_rate=args.lr, beta=args.beta, loss_type="sigmoid",
                  max_length=args.max_length, seed=args.seed, precision=args.precision, log_every=_log_every(args),
                  score_examples=0, score_before=False, eval_examples=1, eval_every=0, save_every=0,
                  name="bench-dpo")
    return TrainConfig.from_settings(**values | overrides)


def _train_pairs(config: TrainConfig) -> list[dict]:
    """The training pairs lorakit's trainer uses (`prepare` in train/setup.py: the seeded subset of
    task-api-prefs' training pairs), as TRL's conversational preference records."""
    from lorakit.data.task_api import generate_preferences

    records = [p.to_record() for p in generate_preferences()[0]]
    if config.train_examples is not None and config.train_examples < len(records):
        picked = sorted(random.Random(config.seed).sample(range(len(records)), config.train_examples))
        records = [records[i] for i in picked]
    return [{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _lorakit_worker(args) -> dict:
    from lorakit.train import train

    run_dir = Path(args.workdir) / f"lorakit-run-{args.round}"
    result = train(_train_config(args, run_dir=str(run_dir)), progress=False)
    s = result.summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    last = next((r for r in reversed(records) if r.get("kind") == "train"), {})
    return {"precision": s["precision"], "attention": s["attention"], "shared_prefix": s["shared_prefix"],
            "steps": s["steps"], "train_seconds": s["train_seconds"], "real_tokens": s["tokens"],
            "padded_tokens": None, "final_loss": last.get("loss"), "reward_accuracy": last.get("reward_accuracy"),
            "reward_margin": last.get("reward_margin"), "peak_rss_mb": _peak_rss_mb(),
            "lora": {k: s[k] for k in ("r", "lora_alpha", "lora_dropout", "target_modules", "trainable")}}


def _trl_worker(args) -> dict:
    import peft
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lorakit.models import load_model
    from lorakit.train.schedule import warmup_steps

    class CountingDPOTrainer(DPOTrainer):
        """Counts the real and padded tokens of each batch it trains on."""

        real_tokens = padded_tokens = 0

        def training_step(self, model, inputs, *rest, **kwargs):
            self.real_tokens += int(inputs["attention_mask"].sum())
            self.padded_tokens += inputs["input_ids"].numel()  # rows x longest row
            return super().training_step(model, inputs, *rest, **kwargs)

    config = _train_config(args)
    lora = config.lora
    model, tokenizer = load_model(config.model, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=lora.r, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
        target_modules=sorted(lora.target_modules), use_rslora=lora.use_rslora, task_type="CAUSAL_LM"))
    out_dir = Path(args.workdir) / f"trl-{args.peer_precision}-{args.round}"
    training_args = DPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=config.batch_size, gradient_accumulation_steps=1,
        max_steps=args.steps, learning_rate=config.learning_rate, beta=config.beta, loss_type=["sigmoid"],
        warmup_steps=warmup_steps(args.steps, config.warmup_ratio), lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config.min_lr_ratio}, weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm, seed=config.seed, bf16=args.peer_precision == "bf16",
        gradient_checkpointing=False, activation_checkpointing=False,  # both: TRL defaults the old name to True
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
        max_length=config.max_length, save_strategy="no", report_to=[], logging_steps=config.log_every,
        disable_tqdm=True)
    trainer = CountingDPOTrainer(model=model, ref_model=None, args=training_args,
                                 train_dataset=Dataset.from_list(_train_pairs(config)), processing_class=tokenizer)
    output = trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    last = logs[-1] if logs else {}
    return {"precision": args.peer_precision, "steps": output.global_step,
            "train_seconds": output.metrics["train_runtime"], "real_tokens": trainer.real_tokens,
            "padded_tokens": trainer.padded_tokens, "trl_num_tokens": last.get("num_tokens"),
            "final_loss": last.get("loss"), "reward_accuracy": last.get("rewards/accuracies"),
            "reward_margin": last.get("rewards/margins"), "peak_rss_mb": _peak_rss_mb(),
            "adapters": sorted(model.peft_config)}


WORKERS = {"lorakit": _lorakit_worker, "trl": _trl_worker}


def _train_side(args, name: str, kind: str, *extra: str) -> dict:
    """Train one side in its own process: its JSON result and the process's wall seconds."""
    out = Path(args.workdir) / f"{name}.json"
    flags = [f"--{flag.replace('_', '-')}={getattr(args, flag)}" for flag in SHARED]
    command = [sys.executable, __file__, "--worker", kind, "--workdir", args.workdir, "--out", str(out), *flags, *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    return json.loads(out.read_text()) | {"wall_seconds": time.perf_counter() - started}


def _combine(runs: list[dict]) -> dict:
    """One side over its rounds: the first round's figures, the median training and wall time, the
    largest peak RSS, and every round's times."""
    side = dict(runs[0])
    side["train_seconds"] = statistics.median(r["train_seconds"] for r in runs)
    side["wall_seconds"] = statistics.median(r["wall_seconds"] for r in runs)
    side["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    side["tokens_per_second"] = side["real_tokens"] / side["train_seconds"]
    side["rounds"] = [{k: r[k] for k in ("train_seconds", "wall_seconds", "peak_rss_mb", "real_tokens", "final_loss",
                                         "reward_accuracy")} for r in runs]
    return side


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(sides: dict[str, dict]) -> str:
    head = f"{'side':<11}{'wall s':>8}{'train s':>9}{'real tok':>10}{'tok/s':>8}{'padded tok':>11}" \
           f"{'RSS MB':>8}{'loss':>8}{'acc':>6}"
    rows = [head, "-" * len(head)]
    for name, s in sides.items():
        rows.append(f"{name:<11}{s['wall_seconds']:>8.1f}{s['train_seconds']:>9.1f}{s['real_tokens']:>10,}"
                    f"{s['tokens_per_second']:>8.0f}{_num(s['padded_tokens'], ','):>11}{s['peak_rss_mb']:>8.0f}"
                    f"{_num(s['final_loss'], '.4f'):>8}{_num(s['reward_accuracy'], '.0%'):>6}")
    lk = sides["lorakit"]
    for name, s in sides.items():
        if name != "lorakit":
            rows.append(f"lorakit vs {name}: real tokens/s {lk['tokens_per_second'] / s['tokens_per_second']:.2f}x, "
                        f"peak RSS {lk['peak_rss_mb'] / s['peak_rss_mb']:.2f}x, "
                        f"wall time {lk['wall_seconds'] / s['wall_seconds']:.2f}x (lorakit/TRL)")
    return "\n".join(rows)


def _parent(args) -> None:
    peers = [p for p in args.peers.split(",") if p]
    unknown = [p for p in peers if p not in ("fp32", "bf16")]
    if unknown:
        sys.exit(f"--peers {args.peers}: unknown precision(s) {unknown}; use fp32 and/or bf16, e.g. --peers fp32,bf16")
    keep = args.workdir is not None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="lorakit-dpo-")
    try:
        order = ["lorakit"] + [f"trl-{peer}" for peer in peers]
        runs: dict[str, list[dict]] = {name: [] for name in order}
        for r in range(args.rounds):  # this machine drifts: the rounds run the sides in turn, A B C C B A ...
            for name in order if r % 2 == 0 else order[::-1]:
                extra = [f"--round={r}"] + ([f"--peer-precision={name[4:]}"] if name != "lorakit" else [])
                runs[name].append(_train_side(args, f"{name}-{r}", "lorakit" if name == "lorakit" else "trl", *extra))
        sides = {name: _combine(runs[name]) for name in order}
    finally:
        if not keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    lk = sides["lorakit"]
    print()
    print(_table(sides))
    wrong_steps = [f"{name}: {s['steps']} steps" for name, s in sides.items() if s["steps"] != args.steps]
    if wrong_steps:
        print(f"WARNING: not every side took {args.steps} optimizer steps: " + "; ".join(wrong_steps))
    for name, s in sides.items():
        if name != "lorakit" and s["real_tokens"] != lk["real_tokens"]:
            extra = s["real_tokens"] - lk["real_tokens"]
            sequences = 2 * args.steps * args.batch
            print(f"note: {name} trained on {extra:+,} real tokens beside lorakit's {lk['real_tokens']:,} "
                  f"({extra / sequences:+.2f} per sequence over {sequences} sequences); each side's tokens/s "
                  f"counts its own tokens")
    result = {"benchmark": "dpo", "command": [sys.executable, *sys.argv], "machine": machine(),
              "settings": {name: getattr(args, name) for name in SHARED} | {"peers": peers, "rounds": args.rounds,
                                                                           "data": DATA},
              "sides": sides,
              "ratios": {name: {"tokens_per_second": lk["tokens_per_second"] / s["tokens_per_second"],
                                "peak_rss": lk["peak_rss_mb"] / s["peak_rss_mb"],
                                "wall": lk["wall_seconds"] / s["wall_seconds"]}
                         for name, s in sides.items() if name != "lorakit"}}
    write_result(args.json, result)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--peers", default="fp32,bf16", help="TRL DPOTrainer + PEFT precisions to run: fp32, bf16 or both")
    p.add_argument("--train-examples", type=int, default=256, help="preference pairs (the seeded subset)")
    p.add_argument("--steps", type=int, default=32, help="optimizer steps, both sides")
    p.add_argument("--batch", type=int, default=8, help="pairs per step (no gradient accumulation)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=DEFAULTS.beta)
    p.add_argument("--max-length", type=int, default=DEFAULTS.max_length)
    p.add_argument("--log-every", type=int, default=8, help="steps per logged loss / reward accuracy (both sides)")
    p.add_argument("--seed", type=int, default=DEFAULTS.seed)
    p.add_argument("--precision", default=DEFAULTS.precision, help="lorakit's precision: auto, fp32 or bf16")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "dpo.json"))
    p.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--rounds", type=int, default=2,
                   help="train every side this many times, in turn (A B C C B A ...); times are medians")
    # internal: one side of the comparison, run by the parent in its own process
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--peer-precision", choices=("fp32", "bf16"), default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None:
        _parent(args)
        return
    Path(args.out).write_text(json.dumps(WORKERS[args.worker](args)))


if __name__ == "__main__":
    main()
