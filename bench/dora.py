"""One DoRA training step of the default model, lorakit beside PEFT's DoRA, timed in one run.

The same step as bench/train_step.py (SmolLM2-135M-Instruct, a fixed --batch x --seq batch of
task-api tokens, r=--rank, alpha=2r, dropout 0 on all seven projections, fused AdamW lr 1e-4;
forward, loss, backward, optimizer step, zero_grad) with ``use_dora=True``. Configs:

  lorakit-fp32  the lorakit trainer's step in fp32 (DoRA's fused one-node layer)
  lorakit-bf16  the lorakit trainer's step in bf16: bf16 frozen weights, bf16 autocast
  peft-fp32     transformers + PEFT DoRA in fp32
  peft-bf16     transformers + PEFT DoRA, fp32 weights under bf16 autocast

Each config runs in its own process, rounds interleave the configs, the step time is the median
of all timed steps (after --warmup untimed ones). The timing, FLOP counting, summary and table
are bench/train_step.py's own functions, the step built with use_dora=True. Writes --json.

    python bench/dora.py                                                   # the benchmark
    python bench/dora.py --batch 1 --seq 64 --steps 2 --warmup 0 --rounds 1 --matmul-reps 2  # smoke
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import train_step  # bench/train_step.py
from machine import machine  # bench/machine.py

CONFIGS = ("lorakit-fp32", "lorakit-bf16", "peft-fp32", "peft-bf16")


def parse_args(argv=None):
    """train_step's options, with DoRA's configs and results file."""
    argv = list(sys.argv[1:] if argv is None else argv)
    configs = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--configs"), ",".join(CONFIGS))
    rest = [a for i, a in enumerate(argv) if a != "--configs" and (i == 0 or argv[i - 1] != "--configs")]
    if not any(a == "--json" for a in rest):
        rest += ["--json", "bench/results/dora.json"]
    args = train_step.parse_args([*rest, "--configs", "lorakit"])  # validated below instead
    args.configs = [c.strip() for c in configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    args.argv = argv
    return args


def spawn(worker: str, args) -> dict:
    """Run ``--worker`` of this script in a fresh process; its last stdout line is its JSON."""
    cmd = [sys.executable, __file__, *args.argv, "--worker", worker]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"worker {worker} failed with exit code {done.returncode}: {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "matmul":
        print(json.dumps(train_step.matmul_peak(args)))
        return
    if args.worker:
        print(json.dumps(train_step.run_config(args.worker, args, use_dora=True)))
        return

    peaks = spawn("matmul", args)
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for round_ in range(args.rounds):
        for config in args.configs:
            print(f"round {round_ + 1}/{args.rounds}: {config}", flush=True)
            runs[config].append(spawn(config, args))
    summary = train_step.summarize(runs, peaks, args.batch * args.seq)
    for precision in ("fp32", "bf16"):  # lorakit over PEFT at the same precision
        if f"lorakit-{precision}" in summary and f"peft-{precision}" in summary:
            ratio = summary[f"lorakit-{precision}"]["tokens_per_s"] / summary[f"peft-{precision}"]["tokens_per_s"]
            summary[f"lorakit-{precision}"]["vs_peft_same_precision"] = ratio
            print(f"lorakit DoRA {precision}: {ratio:.2f}x PEFT DoRA {precision} per step")
    train_step.print_table(summary, peaks)
    if args.steps < 5:
        print(f"--steps {args.steps}: a smoke run, not a measurement (use 5 or more timed steps)")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "argv", "json")}
    path.write_text(json.dumps({"machine": machine(), "settings": settings, "smoke": args.steps < 5,
                                "matmul": peaks, "configs": summary}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
