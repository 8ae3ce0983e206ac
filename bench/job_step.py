"""The whole job's training step, batch layout by batch layout, timed in one process.

`bench/sft.py` times whole runs one after another, and this machine's speed drifts by more than
the difference between two ways of laying out a batch. This script times the trainer's own step
(collate, forward and loss, backward, gradient clipping, AdamW at learning rate 0, so that every
layout sees the same weights) on the job's own micro-batches
(the task-api examples `lorakit train` picks, random batches of --batch-size), with every layout
on every batch, the order alternating from batch to batch, in one process on one model:

  shared   one row: the tokens all the batch's examples start with (task-api: the 15-token
           system prompt and user header) once, then each example's own tokens; lorakit's
           attention lets each see the prefix as its own (`PackingCollator(varlen=True,
           share_prefix=True)`, the trainer's default without LoRA dropout)
  varlen   one row of all the examples, no padding; lorakit's attention attends example by
           example (`PackingCollator(varlen=True)`, the trainer's default with LoRA dropout)
  rows     rows no longer than the longest example, first-fit decreasing (`PackingCollator()`)
  padded   one padded row per example (`Collator`, as `--no-packing`)

Reports seconds per step (forward, backward, optimizer), real tokens/s (the examples' tokens),
the positions computed per real token (below 1 with a shared prefix, above with padding), and
each layout's tokens/s relative to padded; the layouts' losses on each batch agree (printed). Writes --json.

    LORAKIT_CACHE=... python bench/job_step.py [--steps 12] [--train-examples 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lorakit.data import Collator, PackingCollator, real_token_count
from lorakit.evaluation import loss_sum
from lorakit.train import loop, setup
from lorakit.train.config import TrainConfig
from machine import machine  # bench/machine.py


def trainer_step(run, config: TrainConfig, collate, examples: list) -> dict:
    """The trainer's step on one micro-batch of ``examples`` (collate, forward and loss, backward,
    clipping, AdamW), timed by part (collating counts in the forward) with its real tokens,
    positions and loss per label token. bench/compile.py times the same step."""
    t0 = time.perf_counter()
    batch = collate(examples)
    labels = int((batch["labels"][:, 1:] != -100).sum())
    with run.compute.autocast():
        loss, _ = loss_sum(run.model, batch)
    t1 = time.perf_counter()
    (loss / labels).backward()
    t2 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(run.params, config.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0,
            "real_tokens": real_token_count(batch), "positions": batch["input_ids"].numel(),
            "loss": loss.item() / labels}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=12, help="timed batches (each run in every layout)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", default="bench/results/job_step.json")
    args = p.parse_args(argv)

    config = TrainConfig(train_examples=args.train_examples, batch_size=args.batch_size, learning_rate=1e-4,
                         run_dir=str(Path("/tmp") / "lorakit-bench-job-step"))
    run = setup.prepare(config, resume=False)
    run.model.train()
    for group in run.optimizer.param_groups:  # the update runs but changes nothing: every layout sees the same weights
        group["lr"] = 0.0
    pad = run.data.tokenizer.pad_token_id
    layouts = {"shared": PackingCollator(pad, varlen=True, share_prefix=True),
               "varlen": PackingCollator(pad, varlen=True), "rows": PackingCollator(pad), "padded": Collator(pad)}
    batches = loop._epoch_batches([len(e) for e in run.data.examples], config, 0)

    def step(collate, index) -> dict:
        return trainer_step(run, config, collate, [run.data.examples[i] for i in batches[index]])

    for index in range(args.warmup):
        for collate in layouts.values():
            step(collate, index)
    timed = {name: [] for name in layouts}
    names = list(layouts)
    for k, index in enumerate(range(args.warmup, args.warmup + args.steps)):
        for name in names[k % len(names):] + names[:k % len(names)]:  # each layout first in turn
            timed[name].append(step(layouts[name], index))

    results = {}
    for name, steps in timed.items():
        seconds = sum(s["step"] for s in steps)
        results[name] = {
            "median_step_s": statistics.median(s["step"] for s in steps),
            **{f"{part}_s": statistics.mean(s[part] for s in steps) for part in ("forward", "backward", "optimizer")},
            "real_tokens_per_s": sum(s["real_tokens"] for s in steps) / seconds,
            "positions_per_real_token": sum(s["positions"] for s in steps) / sum(s["real_tokens"] for s in steps),
            "steps": steps,
        }
    base = results["padded"]["real_tokens_per_s"]
    print(f"{'layout':8s} {'step s':>7s} {'fwd s':>6s} {'bwd s':>6s} {'opt s':>6s} {'real tok/s':>10s} "
          f"{'pos/token':>9s} {'vs padded':>9s}")
    for name, r in results.items():
        r["vs_padded"] = r["real_tokens_per_s"] / base
        print(f"{name:8s} {r['median_step_s']:7.3f} {r['forward_s']:6.3f} {r['backward_s']:6.3f} "
              f"{r['optimizer_s']:6.3f} {r['real_tokens_per_s']:10.1f} {r['positions_per_real_token']:9.3f} "
              f"{r['vs_padded']:8.2f}x")
    spread = max(max(abs(a["loss"] - b["loss"]) for a, b in zip(timed[name], timed["padded"])) for name in names)
    print(f"largest difference of a batch's loss from the padded layout's: {spread:.2e}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "precision": run.compute.precision,
                               "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
