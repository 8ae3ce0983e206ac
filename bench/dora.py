"""One DoRA training step of the default model, lorakit beside PEFT's DoRA, timed in one run.

The same step as bench/train_step.py (SmolLM2-135M-Instruct, a fixed --batch x --seq batch of
task-api tokens, r=--rank, alpha=2r, dropout 0 on all seven projections, fused AdamW lr 1e-4;
forward, loss, backward, optimizer step, zero_grad) with ``use_dora=True``. Configs:

  lorakit-fp32  the lorakit trainer's step in fp32 (DoRA's fused one-node layer)
  lorakit-bf16  the lorakit trainer's step in bf16: bf16 frozen weights, bf16 autocast
  peft-fp32     transformers + PEFT DoRA in fp32
  peft-bf16     transformers + PEFT DoRA, fp32 weights under bf16 autocast

`python bench/dora.py ARGS` is `python bench/train_step.py ARGS --dora`: the same processes,
interleaved rounds, medians, FLOP counts and table; the results go to bench/results/dora.json.

    python bench/dora.py --configs lorakit-bf16,peft-bf16,peft-fp32         # the benchmark
    python bench/dora.py --batch 1 --seq 64 --steps 2 --warmup 0 --rounds 1 --matmul-reps 2  # smoke
"""

from __future__ import annotations

import sys

import train_step  # bench/train_step.py


def main(argv=None) -> None:
    train_step.main([*(sys.argv[1:] if argv is None else argv), "--dora"])


if __name__ == "__main__":
    main()
