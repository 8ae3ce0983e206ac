"""Memory while loading a large data file: lorakit's streaming reader against reading it whole.

Writes a JSONL file of prompt/completion records (``--mb`` megabytes), then, each in a fresh
process, (a) ``lorakit.data.load_data`` on it (one record at a time, examples kept on disk) and
(b) the same records read into a list and tokenized into lists of ids, as a script would without
a streaming reader. Reports each one's peak RSS above the process's RSS before loading, against
the file's size.

    python bench/data_stream.py --mb 200 --out bench/results/data_stream.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(mode: str, path: str, model: str) -> None:
    from transformers import AutoTokenizer

    from lorakit.data import load_data

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer("warm up")
    before, started = _rss_mb(), time.perf_counter()
    if mode == "lorakit":
        splits = load_data(path, tokenizer=tokenizer, max_length=None)
        examples, tokens = len(splits.train), splits.train.num_tokens
    else:  # the whole file as records, then each as lists of ids and labels
        records = [json.loads(line) for line in open(path)]
        encoded = []
        for r in records:
            prompt = tokenizer(r["prompt"])["input_ids"]
            completion = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            encoded.append((prompt + completion, [-100] * len(prompt) + completion))
        examples, tokens = len(encoded), sum(len(ids) for ids, _ in encoded)
    print(json.dumps({"mode": mode, "examples": examples, "tokens": tokens, "rss_before_mb": round(before, 1),
                      "peak_rss_mb": round(_peak_mb(), 1), "growth_mb": round(_peak_mb() - before, 1),
                      "seconds": round(time.perf_counter() - started, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="size of the data file to write")
    parser.add_argument("--model", help="a model directory with SmolLM2's tokenizer (default: the embedded model)")
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1], args.model)
    if args.model is None:
        from lorakit.models.load import resolve_model_dir

        args.model = str(resolve_model_dir())  # the embedded model, as lorakit train resolves it
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.jsonl"
        with path.open("w") as f:
            i = 0
            while f.tell() < args.mb * 2**20:
                words = " ".join(f"w{(i * 7 + k) % 9973}" for k in range(150))
                f.write(json.dumps({"prompt": f"Record {i}: {words}", "completion": f" answer {i % 97}"}) + "\n")
                i += 1
        size_mb = path.stat().st_size / 2**20
        results = []
        for mode in ("lorakit", "whole"):
            out = subprocess.run([sys.executable, __file__, "--model", args.model, "--child", mode, str(path)],
                                 capture_output=True, text=True, check=True, env=os.environ)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["file_mb"] = round(size_mb, 1)
            result["growth_per_file_mb"] = round(result["growth_mb"] / size_mb, 3)
            results.append(result)
            print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps({"file_mb": round(size_mb, 1), "runs": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
