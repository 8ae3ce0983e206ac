"""Hostile configs: a seeded fuzz of LoraConfig arguments, adapter_config.json files and
config.yaml files, each checked against PEFT 0.21 (the engine is tests/core/config_fuzz.py,
whose smaller seeded run is tests/core/test_config_fuzz.py).

Rerun (about a minute on one core):

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/hostile/configs.py            # seed 0, 1,800 cases
    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/hostile/configs.py --seed 3 --configs 2000

Prints, per door (kwargs: LoraConfig(**kwargs); dict: LoraConfig.from_dict with unknown keys;
file: adapter_config.json on disk loaded by PeftModel.from_pretrained; yaml: config.yaml loaded by
lorakit.train.config.load_train_config) the counts of: accepted and identical to PEFT, typed
lorakit errors (PEFT refuses too or fails later), deliberate differences (lorakit refuses with a
documented reason where PEFT works), untyped exceptions (target 0) and mismatches with PEFT
(target 0); then every untyped case and mismatch, and the deliberate reasons used.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from core.config_fuzz import campaign  # noqa: E402  (the engine lives beside its test)

KINDS = ("identical", "typed", "deliberate", "untyped", "mismatch")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", type=int, default=1000, help="LoraConfig cases (kwargs and dict doors)")
    parser.add_argument("--files", type=int, default=300, help="adapter_config.json cases")
    parser.add_argument("--yaml", type=int, default=500, help="config.yaml cases")
    parser.add_argument("--compare-every", type=int, default=3,
                        help="save and reload in PEFT, comparing logits, for every Nth accepted config")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    verdicts = campaign(args.seed, args.configs, args.files, args.yaml, args.compare_every)
    seconds = time.time() - start
    counts = collections.Counter((v.door, v.kind) for v in verdicts)
    print(f"{len(verdicts)} cases, seed {args.seed}, {seconds:.0f} s")
    print(f"{'door':8}" + "".join(f"{k:>12}" for k in KINDS) + f"{'total':>8}")
    for door in ("kwargs", "dict", "file", "yaml"):
        row = [counts[(door, k)] for k in KINDS]
        print(f"{door:8}" + "".join(f"{n:>12}" for n in row) + f"{sum(row):>8}")
    totals = [sum(counts[(d, k)] for d in ("kwargs", "dict", "file", "yaml")) for k in KINDS]
    print(f"{'all':8}" + "".join(f"{n:>12}" for n in totals) + f"{sum(totals):>8}")
    compared = sum("outputs compared" in v.detail for v in verdicts)
    print(f"accepted configs whose lorakit adapter, loaded in PEFT, gave the same logits: {compared}")
    for v in verdicts:
        if v.kind in ("untyped", "mismatch"):
            print(f"{v.kind.upper()} {v.door}: {v.case!r:.200}\n    {v.detail}")
    reasons = collections.Counter(r for v in verdicts if v.kind == "deliberate"
                                  for r in v.detail.split(" | ", 1)[1].split(" || "))
    print("deliberate differences (lorakit refuses, PEFT works):")
    for reason, n in reasons.most_common():
        print(f"  {n:5}  {reason}")
    return 1 if totals[KINDS.index("untyped")] or totals[KINDS.index("mismatch")] else 0


if __name__ == "__main__":
    sys.exit(main())
