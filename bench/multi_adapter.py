"""Mixed-adapter batches on the default model: lorakit beside PEFT's ``adapter_names``, timed in one run.

Model SmolLM2-135M-Instruct with --loaded LoRA adapters (r=--rank, alpha=2r, all seven
projections; A from PEFT's init, B random and small, as trained adapters are) saved once as PEFT
adapter folders and loaded from those same files by both libraries. A batch of --rows prompts of
--prompt tokens each (task-api text laid end to end) is spread over 1, 4 and 16
of the adapters (row b uses adapter b mod n), and each point is timed two ways:

  prefill   one forward of the whole batch with ``adapter_names`` (logits of the last position
            only, as a generation's prefill), median seconds
  generate  ``model.generate(..., adapter_names=...)``, greedy, exactly --new tokens per row
            (min_new_tokens = max_new_tokens), KV cache; generated tokens per second

Configs: lorakit-fp32, peft-fp32, and on a GPU lorakit-bf16, peft-bf16 (bf16 base and bf16
adapters in both: ``autocast_adapter_dtype=False``). Every (config, adapters) point runs in its
own process, rounds interleave them, and the numbers are medians over all timed repetitions.
The generated tokens of lorakit and PEFT are compared per point (a digest of the ids).
Targets: 16 adapters within 1.3x of one adapter's time, and faster than PEFT at every point.
Writes --json (bench/results/multi_adapter.json).

    python bench/multi_adapter.py          # the benchmark (a quiet machine; minutes on a GPU)
    python bench/multi_adapter.py --rows 2 --prompt 16 --new 2 --adapters 1,2 --reps 1 --warmup 0 --rounds 1  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import train_step  # bench/train_step.py: MODEL, TARGETS, sync
from machine import machine  # bench/machine.py

MODEL = train_step.MODEL
TARGETS = train_step.TARGETS
CONFIGS = ("lorakit-fp32", "peft-fp32", "lorakit-bf16", "peft-bf16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=16, help="prompts in the batch")
    p.add_argument("--prompt", type=int, default=64, help="tokens per prompt")
    p.add_argument("--new", type=int, default=32, help="generated tokens per row")
    p.add_argument("--rank", type=int, default=16, help="LoRA r; lora_alpha is 2r")
    p.add_argument("--adapters", default="1,4,16", help="comma list: how many adapters the batch is spread over")
    p.add_argument("--loaded", type=int, default=None, help="adapters loaded in every config (default: the most used)")
    p.add_argument("--configs", default=None, help=f"comma list of {', '.join(CONFIGS)} "
                                                   "(default: the fp32 pair, and the bf16 pair on a GPU)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per worker; under 3 is a smoke run")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="times every point's worker runs, interleaved")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", default="bench/results/multi_adapter.json")
    p.add_argument("--adapter-dir", help=argparse.SUPPRESS)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.counts = [int(n) for n in args.adapters.split(",") if n.strip()]
    args.loaded = args.loaded or max(args.counts)
    if min(args.counts) < 1 or max(args.counts) > args.loaded or max(args.counts) > args.rows:
        p.error(f"--adapters {args.adapters}: each count must be from 1 to --loaded ({args.loaded}) and --rows")
    gpu = torch.cuda.is_available()
    args.configs = [c.strip() for c in (args.configs or ",".join(CONFIGS[:4] if gpu else CONFIGS[:2])).split(",")]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    return args


def make_adapters(args) -> None:
    """Save --loaded adapters as PEFT folders ``<adapter-dir>/a<k>`` (lorakit writes PEFT's layout)."""
    import lorakit
    import lorakit.models
    from lorakit.inject import lora_layers

    base, _ = lorakit.models.load_model(MODEL)
    config = lorakit.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    torch.manual_seed(0)
    model = lorakit.get_peft_model(base, config, adapter_name="a0")
    for k in range(1, args.loaded):
        model.add_adapter(f"a{k}", config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in lora_layers(model.get_base_model()):
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=g) * 0.01)
    model.save_pretrained(args.adapter_dir)


def load(lib: str, precision: str, args, device: torch.device):
    """The base model with every adapter loaded from the same files, in eval mode."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    folders = [Path(args.adapter_dir) / f"a{k}" for k in range(args.loaded)]
    if lib == "lorakit":
        import lorakit
        import lorakit.models

        base, _ = lorakit.models.load_model(MODEL, device=device, dtype=dtype)
        model = lorakit.PeftModel.from_pretrained(base, folders[0], adapter_name="a0", autocast_adapter_dtype=False)
        for k, folder in enumerate(folders[1:], 1):
            model.load_adapter(folder, adapter_name=f"a{k}")
    else:
        import peft
        from transformers import AutoModelForCausalLM

        from lorakit.models import resolve_model_dir

        base = AutoModelForCausalLM.from_pretrained(resolve_model_dir(MODEL), dtype=dtype).to(device)
        model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name="a0", autocast_adapter_dtype=False)
        for k, folder in enumerate(folders[1:], 1):
            model.load_adapter(folder, adapter_name=f"a{k}", autocast_adapter_dtype=False)
    return model.eval()


def prompts(tokenizer, rows: int, length: int) -> torch.Tensor:
    """task-api examples laid end to end and cut into (rows, length) prompts; the same for every config."""
    from lorakit.data import load_data

    ids: list[int] = []
    for example in load_data("task-api", tokenizer=tokenizer, max_length=512, seed=0).train.examples:
        ids += example.input_ids
        if len(ids) >= rows * length:
            break
    if len(ids) < rows * length:
        raise SystemExit(f"task-api has only {len(ids)} training tokens; ask for fewer than {rows} x {length}")
    return torch.tensor(ids[: rows * length]).view(rows, length)  # (rows, length)


def timed(fn, args, device) -> tuple[list[float], object]:
    """Seconds of each of --reps calls after --warmup untimed ones, and the last result."""
    times, out = [], None
    for i in range(args.warmup + args.reps):
        train_step.sync(device)
        started = time.perf_counter()
        out = fn()
        train_step.sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    return times, out


@torch.no_grad()
def run_point(worker: str, args) -> dict:
    """One worker: ``<config>:<adapters>``; prefill and generate times, and the tokens' digest."""
    config, n = worker.rsplit(":", 1)
    lib, precision = config.split("-")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from lorakit.models import load_tokenizer

    tokenizer = load_tokenizer(MODEL)
    ids = prompts(tokenizer, args.rows, args.prompt).to(device)  # (rows, prompt)
    mask = torch.ones_like(ids)
    names = [f"a{b % int(n)}" for b in range(args.rows)]
    model = load(lib, precision, args, device)

    def prefill():
        return model(input_ids=ids, attention_mask=mask, adapter_names=names, logits_to_keep=1).logits

    def generate():
        return model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, do_sample=False,
                              max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=tokenizer.pad_token_id)

    prefill_s, _ = timed(prefill, args, device)
    generate_s, out = timed(generate, args, device)
    new = out[:, ids.shape[1]:]  # (rows, new)
    if new.shape[1] != args.new:
        raise SystemExit(f"{worker}: generated {new.shape[1]} tokens per row, expected {args.new}")
    return {"config": config, "lib": lib, "precision": precision, "adapters": int(n), "device": str(device),
            "threads": torch.get_num_threads(), "prefill_s": prefill_s, "generate_s": generate_s,
            "tokens_digest": hashlib.sha256(str(new.tolist()).encode()).hexdigest()[:16],
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def spawn(worker: str, args) -> dict:
    """Run ``--worker`` in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, *args.argv, "--adapter-dir", args.adapter_dir, "--worker", worker]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"worker {worker} failed with exit code {done.returncode}: {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1] if done.stdout.strip() else "{}")


def summarize(runs: dict[str, list[dict]], args) -> dict:
    """Per point: all times, medians, tokens/s; then the ratios the targets are about."""
    points = {}
    for key, results in runs.items():
        first = results[0]
        prefill = statistics.median(t for r in results for t in r["prefill_s"])
        generate = statistics.median(t for r in results for t in r["generate_s"])
        cuda = [r["cuda_peak_mb"] for r in results if r["cuda_peak_mb"] is not None]
        points[key] = {
            "config": first["config"], "adapters": first["adapters"], "device": first["device"],
            "threads": first["threads"], "prefill_s": [r["prefill_s"] for r in results],
            "generate_s": [r["generate_s"] for r in results], "median_prefill_s": prefill,
            "median_generate_s": generate, "tokens_per_s": args.rows * args.new / generate,
            "tokens_digest": sorted({r["tokens_digest"] for r in results}),
            "cuda_peak_mb": max(cuda) if cuda else None,
        }
    for key, row in points.items():
        lib, precision = row["config"].split("-")
        n = row["adapters"]
        if lib == "lorakit":
            peer = points.get(f"peft-{precision}:{n}")
            if peer:
                row["vs_peft_tokens_per_s"] = row["tokens_per_s"] / peer["tokens_per_s"]
                row["vs_peft_prefill"] = peer["median_prefill_s"] / row["median_prefill_s"]
                row["same_tokens_as_peft"] = row["tokens_digest"] == peer["tokens_digest"]
        one = points.get(f"{row['config']}:{min(args.counts)}")
        if one:
            row["generate_vs_fewest"] = row["median_generate_s"] / one["median_generate_s"]
            row["prefill_vs_fewest"] = row["median_prefill_s"] / one["median_prefill_s"]
    return points


def targets(points: dict, args) -> dict:
    """The two targets, checked on the measured points."""
    most, fewest = max(args.counts), min(args.counts)
    spread = {row["config"]: row["generate_vs_fewest"] for row in points.values()
              if row["config"].startswith("lorakit") and row["adapters"] == most and "generate_vs_fewest" in row}
    ratios = [row[k] for row in points.values() for k in ("vs_peft_tokens_per_s", "vs_peft_prefill") if k in row]
    return {f"lorakit_{most}_vs_{fewest}_adapters_generate_time": spread,
            "within_1.3x": all(v <= 1.3 for v in spread.values()) if spread else None,
            "faster_than_peft_everywhere": all(r > 1 for r in ratios) if ratios else None}


def ratio_of(row: dict):
    """A formatter of the ratio under a key of ``row``: "1.23x", or "-" when it was not measured."""
    return lambda key: f"{row[key]:.2f}x" if key in row else "-"


def print_table(points: dict, goals: dict) -> None:
    head = ["config", "adapters", "tokens/s", "vs PEFT", "vs fewest", "prefill s", "vs PEFT", "vs fewest",
            "same tokens"]
    rows = []
    for row in sorted(points.values(), key=lambda r: (r["config"].split("-")[1], r["adapters"], r["config"])):
        fmt = ratio_of(row)
        rows.append([row["config"], row["adapters"], f"{row['tokens_per_s']:.1f}", fmt("vs_peft_tokens_per_s"),
                     fmt("generate_vs_fewest"), f"{row['median_prefill_s']:.3f}", fmt("vs_peft_prefill"),
                     fmt("prefill_vs_fewest"), {True: "yes", False: "NO"}.get(row.get("same_tokens_as_peft"), "-")])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for line in [head, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
    print("vs PEFT: lorakit's speed over PEFT's (above 1 is faster); vs fewest: time over the same config's "
          "time with the fewest adapters; same tokens: greedy ids equal to PEFT's (in bf16, rounding may differ)")
    print(f"targets: {json.dumps(goals)}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "adapters":
        make_adapters(args)
        print("{}")
        return
    if args.worker:
        print(json.dumps(run_point(args.worker, args)))
        return

    with tempfile.TemporaryDirectory(prefix="lorakit-bench-adapters-") as folder:
        args.adapter_dir = folder
        spawn("adapters", args)
        keys = [f"{c}:{n}" for n in args.counts for c in args.configs]
        runs: dict[str, list[dict]] = {k: [] for k in keys}
        for round_ in range(args.rounds):
            for key in keys:
                print(f"round {round_ + 1}/{args.rounds}: {key}", flush=True)
                runs[key].append(spawn(key, args))
    points = summarize(runs, args)
    goals = targets(points, args)
    print_table(points, goals)
    smoke = args.reps < 3
    if smoke:
        print(f"--reps {args.reps}: a smoke run, not a measurement (use 3 or more timed repetitions)")
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "argv", "json", "adapter_dir")}
    path.write_text(json.dumps({"machine": machine(), "settings": settings, "smoke": smoke,
                                "points": points, "targets": goals}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
