"""`lorakit train` on one process vs several (DDP, FSDP2), side by side in one run.

    speed   the default model on the same examples and steps: one process of batch B and of batch
            N x B (every core / one GPU), against N processes of batch B each (DDP, then FSDP2), each
            with its share of the cores (or its GPU); real tokens/s, the scaling efficiency
            (tokens/s / (N x one process of batch B)), each process's peak memory (VmHWM), the
            held-out loss after
    memory  a model of Llama-3.2-1B's shape (its real config, seeded random bf16 weights; nothing is
            downloaded), N processes, DDP then FSDP2: the frozen weights each process holds (the
            run's own line) and each process's peak memory

    python bench/distributed.py [--parts speed,memory] [--nproc 2] [--steps 12] [--json ...]
    bash bench/gpu.sh run-distributed     the same on a GPU machine, one process per GPU

Every run is the real command (`lorakit train --nproc 2 ...`); a process's memory is read from
/proc while it runs (its high-water mark, VmHWM, which the kernel keeps).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from machine import machine, write_result  # noqa: E402  (bench/machine.py)

LLAMA_3_2_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
                    head_dim=64)
"""meta-llama/Llama-3.2-1B's config.json (the rope scaling left out: it changes no shape or memory)."""


def _peak_rss(pid: int) -> int | None:
    """The process's peak resident memory so far (VmHWM, kept by the kernel), in bytes."""
    try:
        found = re.search(r"^VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    except OSError:
        return None
    return int(found.group(1)) * 1024 if found else None


def _descendants(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children + [d for c in children for d in _descendants(c)]


def _run(command: list[str], env: dict) -> dict:
    """Run a lorakit command; every python process under it watched for its memory until it ends."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: dict[int, int] = {}
    done = threading.Event()

    def watch():
        while not done.is_set():
            for pid in [proc.pid, *_descendants(proc.pid)]:
                peak = _peak_rss(pid)
                if peak:
                    seen[pid] = peak
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{out[-4000:]}")
    workers = [peak for pid, peak in seen.items() if pid != proc.pid] or [seen.get(proc.pid, 0)]
    return {"wall_s": time.perf_counter() - started, "output": out, "peak_mb": [round(p / 2**20) for p in workers]}


def _metrics(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    last = train[-1]
    return {"tokens": last["tokens"], "train_s": last["elapsed_s"], "tokens_per_s": last["tokens"] / last["elapsed_s"],
            "final_loss": last["loss"], "heldout_after": evals[-1]["eval_loss"] if evals else None,
            "losses": [r["loss"] for r in train]}


def _frozen_mib(output: str) -> float | None:
    found = re.search(r"frozen weights held by each process: ([\d,.]+) MiB", output)
    return float(found.group(1).replace(",", "")) if found else None


def speed(args, workdir: Path) -> list[dict]:
    common = ["--model", args.model, "--data", "task-api", "--train-examples", str(args.examples), "--max-steps",
              str(args.steps), "--grad-accum", "2", "--eval-every", "0", "--eval-examples", "50",
              "--score-examples", "0", "--log-every", "1", "--save-every", "0", "--no-progress",
              "--max-length", "512"]
    n = args.nproc
    sides = [("1 process, batch B", 1, "ddp", args.batch),
             (f"1 process, batch {n}B", 1, "ddp", n * args.batch),
             (f"{n} processes, DDP", n, "ddp", args.batch),
             (f"{n} processes, FSDP2", n, "fsdp", args.batch)]
    rows = []
    for name, nproc, strategy, batch in sides:
        run_dir = workdir / f"speed-{nproc}-{strategy}"
        command = [sys.executable, "-m", "lorakit", "train", *common, "--batch-size", str(batch), "--run-dir",
                   str(run_dir), *(["--nproc", str(nproc), "--strategy", strategy] if nproc > 1 else [])]
        result = _run(command, dict(os.environ))
        rows.append({"side": name, "processes": nproc, "strategy": strategy, "batch_each": batch,
                     **_metrics(run_dir), "peak_mb": result["peak_mb"], "frozen_mib_each": _frozen_mib(result["output"])})
        rows[-1]["scaling_efficiency"] = rows[-1]["tokens_per_s"] / (nproc * rows[0]["tokens_per_s"])
        print(f"{name:<22} {rows[-1]['tokens_per_s']:8.1f} tokens/s  efficiency {rows[-1]['scaling_efficiency']:.2f}"
              f"  peak MB per process {rows[-1]['peak_mb']}  held-out {rows[-1]['heldout_after']:.4f}", flush=True)
    return rows


def _llama_1b_dir(workdir: Path, tokenizer_from: str) -> Path:
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models import resolve_model_dir

    path = workdir / "llama-3.2-1b-shaped"
    source = resolve_model_dir(tokenizer_from)
    path.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(source):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "chat_template")):
            shutil.copy(source / name, path / name)
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_3_2_1B, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    return path


def memory(args, workdir: Path) -> list[dict]:
    model_dir = _llama_1b_dir(workdir, args.model)
    common = ["--model", str(model_dir), "--data", "task-api", "--train-examples", "8", "--max-steps", "2",
              "--batch-size", "1", "--max-length", "128", "--eval-every", "0", "--eval-examples", "2",
              "--score-examples", "0", "--log-every", "1", "--save-every", "0", "--no-progress",
              "--precision", "bf16", "--rank", "16", "--target-modules", "q_proj", "k_proj", "v_proj", "o_proj"]
    rows = []
    for strategy in ("ddp", "fsdp"):
        run_dir = workdir / f"memory-{strategy}"
        result = _run([sys.executable, "-m", "lorakit", "train", *common, "--run-dir", str(run_dir), "--nproc",
                       str(args.nproc), "--strategy", strategy], dict(os.environ))
        rows.append({"strategy": strategy, "frozen_mib_each": _frozen_mib(result["output"]),
                     "peak_mb": result["peak_mb"], **_metrics(run_dir)})
        print(f"{strategy:<5} frozen weights per process {rows[-1]['frozen_mib_each']} MiB  peak MB {result['peak_mb']}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="speed,memory")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--nproc", type=int, default=2, help="processes of the several-process sides (GPUs: one each)")
    p.add_argument("--batch", type=int, default=4, help="B: each process's batch")
    p.add_argument("--examples", type=int, default=512)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "distributed.json"))
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-distributed-") as tmp:
        if "speed" in parts:
            results["speed"] = speed(args, Path(tmp))
        if "memory" in parts:
            results["memory"] = memory(args, Path(tmp))
    out = {"benchmark": "distributed", "command": [sys.executable, *sys.argv], "machine": machine(),
           "settings": vars(args), **results}
    write_result(args.json, out)


if __name__ == "__main__":
    main()
