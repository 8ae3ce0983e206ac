"""Run one real training (`lorakit.train.train`) and print, as one JSON line, the process's peak
RSS and the largest batch it trained on. Used by test_plan_peak_rss.py in a subprocess, so that
the peak belongs to the run alone:

    python tests/plan/train_peak.py '{"model": "smollm2-135m", "data": "data.jsonl", ...}'

The argument is a TrainConfig as JSON. The trainer's loss function is wrapped only to record the
shape of the largest training batch (examples x longest example, as a padded batch would have
it, also when the trainer lays the examples in one row) and the most label positions a training
batch had.
"""

import json
import sys

import torch

import lorakit.train.objectives as objectives
from lorakit.data import IGNORE_INDEX
from lorakit.train import TrainConfig, train


def main() -> None:
    largest = {"batch_size": 0, "seq_len": 0, "label_positions": 0}
    loss_sum = objectives.loss_sum  # the trainer's step calls it (SupervisedObjective, in distributed.LossModule)

    def recording(model, batch):
        if torch.is_grad_enabled():  # a training step, not a held-out evaluation
            b, t = batch["input_ids"].shape
            if "cu_seq_lens" in batch:  # one row of examples (packing): B examples, the longest of them
                prefix = int(batch.get("shared_prefix", 0))
                lengths = batch["cu_seq_lens"][1 if prefix else 0:].diff() + prefix
                b, t = len(lengths), int(lengths.max())
            labels = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            if b * t > largest["batch_size"] * largest["seq_len"]:
                largest.update(batch_size=b, seq_len=t)
            largest["label_positions"] = max(labels, largest["label_positions"])
        return loss_sum(model, batch)

    objectives.loss_sum = recording
    result = train(TrainConfig.from_settings(**json.loads(sys.argv[1])), progress=False)
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    peak = int(status["VmHWM"].split()[0]) * 1024  # peak resident set size, kB -> bytes
    print(json.dumps({"peak_rss": peak, "precision": result.summary["precision"],
                      "steps": result.steps, **largest}))


if __name__ == "__main__":
    main()
