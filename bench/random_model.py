"""A model directory with the default model's architecture and tokenizer but seeded random weights.

For machines the default model's file cannot travel to (the lent GPU machine takes 64 MiB of
files; the embedded GGUF is 98 MB): the speed of a training step does not depend on the weights'
values, and every config of `bench/train_step.py --model DIR` loads the same weights.

    python bench/random_model.py SOURCE_DIR OUT_DIR [--seed 0]

SOURCE_DIR holds the model's config.json and tokenizer files (`bench/gpu.sh prepare` copies them
from lorakit's cache); OUT_DIR gets those files and a model.safetensors of fp32 weights.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not (args.source / "config.json").is_file():
        raise SystemExit(f"{args.source} has no config.json; run `bench/gpu.sh prepare` to make it")
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.source), dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    for path in args.source.iterdir():
        if path.is_file() and path.name != "config.json" and not path.name.endswith(".safetensors"):
            shutil.copy2(path, args.out / path.name)
    print(f"wrote {args.out}: {sum(p.numel() for p in model.parameters()):,} parameters, seed {args.seed}")


if __name__ == "__main__":
    main()
