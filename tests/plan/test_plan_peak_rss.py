"""The memory estimate against the measured peak RSS of real training runs of the default model.

Each run is `lorakit.train.train` in its own process (tests/plan/train_peak.py), on data whose
records are all cut to one length by max_length, so that every batch has the same shape. The
estimate gets what the run did: the model, the LoRA settings, the batch, the longest padded
batch length, the share of positions that were labels, and the trainer's precision.
"""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from lorakit.config import preset
from lorakit.plan import estimate

SCRIPT = Path(__file__).with_name("train_peak.py")
WORDS = ("the model reads a long line of plain words so that every example is cut to the same "
         "length and no batch needs padding").split()
MiB = 2 ** 20


def write_records(path: Path, kind: str, tokens: int, n: int = 32) -> Path:
    """``n`` records, each longer than ``tokens`` tokens: plain text (every position labelled)
    or prompt/completion (the prompt, about a third of the tokens, is not)."""
    rng = random.Random(0)

    def words(k):
        return " ".join(rng.choice(WORDS) for _ in range(k))

    with path.open("w") as f:
        for _ in range(n):
            record = ({"text": words(2 * tokens)} if kind == "text" else
                      {"prompt": words(tokens // 3), "completion": words(2 * tokens)})
            f.write(json.dumps(record) + "\n")
    return path


def measured_run(model_dir: Path, run: Path, name: str, batch_size: int, max_length: int, kind: str,
                 quantize: str | None = None):
    """(what the run measured, the estimate of what it did): 3 steps of `lorakit.train.train` in
    their own process, on ``kind`` records cut to ``max_length``, with ``quantize`` as --quantize."""
    config = dict(model="smollm2-135m", data=str(write_records(run / "data.jsonl", kind, max_length)),
                  val_fraction=0.1, preset=name, batch_size=batch_size, max_length=max_length,
                  max_steps=3, eval_every=0, eval_examples=2, score_examples=0, save_every=0,
                  log_every=1, run_dir=str(run / "run"), quantize=quantize)
    done = subprocess.run([sys.executable, str(SCRIPT), json.dumps(config)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["steps"] == 3 and measured["seq_len"] == max_length
    bf16 = measured["precision"] == "bf16"
    memory = estimate(model_dir, preset(name), batch_size=measured["batch_size"],
                      seq_len=measured["seq_len"], dtype="bfloat16" if bf16 else "float32",
                      autocast=bf16, quantize=quantize, label_fraction=measured["label_positions"]
                      / (measured["batch_size"] * measured["seq_len"])).memory
    return measured, memory


# (preset, batch size, max_length, records): each run is 3 steps, the peak settles by the third.
RUNS = [
    ("conservative", 4, 256, "text"),
    ("balanced", 8, 128, "completion"),
    ("max_capacity", 4, 256, "text"),
]


@pytest.mark.slow
def test_estimate_is_within_25_percent_of_peak_rss(default_model_dir, tmp_path):
    rows = []
    for name, batch_size, max_length, kind in RUNS:
        run = tmp_path / f"{name}-{batch_size}x{max_length}"
        run.mkdir()
        rows.append((name, *measured_run(default_model_dir, run, name, batch_size, max_length, kind)))
    report = "\n".join(
        f"{name} {m['batch_size']}x{m['seq_len']} labels {m['label_positions']}: estimate "
        f"{e.total / MiB:,.0f} MiB, peak RSS {m['peak_rss'] / MiB:,.0f} MiB "
        f"({e.total / m['peak_rss'] - 1:+.1%})" for name, m, e in rows)
    print(report)
    for name, m, e in rows:
        assert abs(e.total - m["peak_rss"]) <= 0.25 * m["peak_rss"], report
