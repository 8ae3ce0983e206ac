"""The trainer's step with and without `--compile` (torch.compile of the decoder layers), side by side.

Each side trains the job's own micro-batches (the task-api examples `lorakit train` picks, random
batches of --batch-size, the trainer's default one-row layout) for --steps optimizer steps from
the same start, in its own process, the sides in turn (eager, compiled, compiled, eager: this
machine's speed drifts over minutes). The first compiled process starts from an empty compile
cache (its own TORCHINDUCTOR_CACHE_DIR), the second from the cache the first left, as a user's
first and later runs would. For each process: the first steps' seconds (they include compiling),
the median step after --warmup steps, real tokens/s over the steps after warm-up, and the losses
of the first steps (the same training on both sides, up to bf16 rounding).

Reports the compiled side's tokens/s relative to eager and how many steps its compile time takes
to pay back. Writes --json.

    LORAKIT_CACHE=... python bench/compile.py [--steps 30] [--warmup 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine  # bench/machine.py


def _child(args) -> dict:
    from job_step import trainer_step  # bench/job_step.py: the trainer's step, timed
    from lorakit.train import loop, setup
    from lorakit.train.config import TrainConfig

    config = TrainConfig(train_examples=args.train_examples, batch_size=args.batch_size, learning_rate=1e-3,
                         compile=args.compiled, run_dir=str(Path(tempfile.mkdtemp(prefix="lorakit-bench-"))))
    run = setup.prepare(config, resume=False)
    run.model.train()
    lengths, batches, epoch = [len(e) for e in run.data.examples], [], 0
    while len(batches) < args.steps:  # epoch after epoch, as the trainer goes on
        batches += loop._epoch_batches(lengths, config, epoch)
        epoch += 1
    steps = [trainer_step(run, config, run.data.train_collate, [run.data.examples[i] for i in batches[index]])
             for index in range(args.steps)]
    after = steps[args.warmup:]
    return {"compiled": args.compiled, "precision": run.compute.precision,
            "first_steps_s": [s["step"] for s in steps[:args.warmup]],
            "median_step_s": statistics.median(s["step"] for s in after),
            "real_tokens_per_s": sum(s["real_tokens"] for s in after) / sum(s["step"] for s in after),
            "losses": [s["loss"] for s in steps]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=6, help="first steps left out of the rate (compiling happens here)")
    p.add_argument("--json", default="bench/results/compile.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(_child(args)), flush=True)
        return

    cache = tempfile.mkdtemp(prefix="lorakit-inductor-")  # empty: the first compiled run compiles from scratch
    runs = []
    for compiled in (False, True, True, False):
        command = [sys.executable, __file__, "--child", "--train-examples", str(args.train_examples),
                   "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        command += ["--compiled"] if compiled else []
        done = subprocess.run(command, capture_output=True, text=True,
                              env=os.environ | {"TORCHINDUCTOR_CACHE_DIR": cache})
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            sys.exit(f"{'compiled' if compiled else 'eager'} run failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(lines[-1][len("RESULT "):]))
        r = runs[-1]
        print(f"{'compiled' if compiled else 'eager':8s} first steps {' '.join(f'{s:.2f}' for s in r['first_steps_s'])} s"
              f"  median step {r['median_step_s']:.3f} s  real tokens/s {r['real_tokens_per_s']:.1f}", flush=True)

    eager = statistics.median(r["real_tokens_per_s"] for r in runs if not r["compiled"])
    compiled = statistics.median(r["real_tokens_per_s"] for r in runs if r["compiled"])
    eager_step = statistics.median(r["median_step_s"] for r in runs if not r["compiled"])
    compiled_step = statistics.median(r["median_step_s"] for r in runs if r["compiled"])
    saving = eager_step - compiled_step
    summary = {"eager_real_tokens_per_s": eager, "compiled_real_tokens_per_s": compiled, "ratio": compiled / eager}
    for label, r in zip(("cold", "warm"), (runs[1], runs[2])):
        extra = sum(r["first_steps_s"]) - eager_step * len(r["first_steps_s"])  # compiling, beyond a step's work
        summary[f"compile_s_{label}_cache"] = extra
        summary[f"payback_steps_{label}_cache"] = extra / saving if saving > 0 else None
    loss_gap = max(abs(a - b) for a, b in zip(runs[0]["losses"], runs[1]["losses"]))
    print(f"compiled / eager real tokens/s: {summary['ratio']:.3f}x ({compiled:.1f} / {eager:.1f})")
    for label in ("cold", "warm"):
        payback = summary[f"payback_steps_{label}_cache"]
        print(f"compiling with a {label} cache: {summary[f'compile_s_{label}_cache']:.1f} s, paid back after "
              f"{'never' if payback is None else f'{payback:.0f} steps'}")
    print(f"largest difference of a step's loss, eager vs compiled: {loss_gap:.2e}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "args": vars(args), "summary": summary, "loss_gap": loss_gap,
                               "runs": runs}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
