"""One LoRA training step of the default model, lorakit beside PEFT, timed in one run.

Model SmolLM2-135M-Instruct (--model: another, e.g. the same architecture with random weights
where the model file cannot go; bench/gpu.sh); a fixed batch of --batch x --seq tokens cut from the built-in
task-api training data (labels only on the answers, attention mask all ones); LoRA r=--rank,
alpha=2r, dropout 0 on all seven projections; AdamW lr 1e-4 (the fused kernel, for every config). A step is forward, loss, backward,
optimizer step, zero_grad (no gradient clipping in any config). Configs:

  lorakit       the lorakit trainer's step: bf16 frozen weights and bf16 autocast where the hardware
                multiplies bf16 natively (resolve_precision("auto")), else fp32; loss_sum runs
                the output head on label positions only
  lorakit-fp32  the same step forced to fp32 (optional)
  peft-bf16     transformers + PEFT, fp32 weights, under bf16 autocast (PEFT's best setting)
  peft-fp32     transformers + PEFT in fp32; transformers' own loss over all positions

Each config runs in its own process (so peak RSS is its own), rounds interleave the configs, and
the step time is the median over all timed steps. FLOPs per step are counted with torch's
FlopCounterMode; the matmul peak is measured in a separate process. Writes --json.

    python bench/train_step.py                  # the benchmark (tens of minutes on 2 CPU cores)
    python bench/train_step.py --batch 1 --seq 64 --steps 1 --warmup 0 --rounds 1 --matmul-reps 2  # smoke
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from machine import machine  # bench/machine.py

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ("lorakit", "lorakit-fp32", "lorakit-bf16", "peft-bf16", "peft-fp32")
MATMUL_SHAPES = [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (2048, 2048, 2048), (4096, 4096, 4096)]

# torch's FlopCounterMode knows the CUDA attention kernels but not the CPU one; for it we count
# with torch's own SDPA formulas (forward: QK^T and PV; backward: the recomputed QK^T and four more
# matmuls; full Sq x Sk, causal masking not subtracted, as torch counts the CUDA kernels).
aten = torch.ops.aten
CPU_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=MODEL,
                   help="the model (an embedded name, a .gguf or a model directory; bench/gpu.sh passes one "
                        "with random weights)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA r; lora_alpha is 2r")
    p.add_argument("--steps", type=int, default=5, help="timed steps per worker; under 5 is a smoke run")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="times every config's worker is run, interleaved")
    p.add_argument("--configs", default="lorakit,peft-bf16,peft-fp32", help=f"comma list of {', '.join(CONFIGS)}")
    p.add_argument("--dora", action="store_true", help="DoRA adapters (use_dora=True) in both libraries")
    p.add_argument("--json", default=None, help="default bench/results/train_step.json (dora.json with --dora)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--matmul-reps", type=int, default=10, help="timed repetitions per matmul shape")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.json = args.json or f"bench/results/{'dora' if args.dora else 'train_step'}.json"
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def fixed_batch(tokenizer, batch: int, seq: int, device: torch.device) -> dict[str, torch.Tensor]:
    """task-api examples laid end to end and cut into (batch, seq) rows; the same for every config."""
    from lorakit.data import load_data

    ids, labels = [], []
    for example in load_data("task-api", tokenizer=tokenizer, max_length=512, seed=0).train.examples:
        ids += example.input_ids
        labels += example.labels
        if len(ids) >= batch * seq:
            break
    if len(ids) < batch * seq:
        raise SystemExit(f"task-api has only {len(ids)} training tokens; ask for fewer than {batch} x {seq}")
    input_ids = torch.tensor(ids[: batch * seq]).view(batch, seq)  # (B, T)
    targets = torch.tensor(labels[: batch * seq]).view(batch, seq)  # (B, T), -100 on prompts
    if not (targets[:, 1:] != -100).any():
        raise SystemExit(f"a {batch} x {seq} batch holds prompt tokens only (no loss); use --seq 64 or more")
    return {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
            "labels": targets.to(device)}


def build_step(config: str, args, device: torch.device, **lora_extra):
    """(step function returning the loss, precision, label tokens) for one config; model and
    optimizer live inside the step function. ``lora_extra``: more LoraConfig fields for both
    libraries (bench/dora.py passes use_dora=True)."""
    import lorakit
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.train.fast import make_optimizer

    batch = fixed_batch(load_tokenizer(args.model), args.batch, args.seq, device)
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                task_type="CAUSAL_LM", **lora_extra)
    if config.startswith("lorakit"):
        from lorakit.evaluation import loss_sum
        from lorakit.train.fast import speed_up
        from lorakit.train.setup import autocast_for, resolve_precision

        precision = {"lorakit-fp32": "fp32", "lorakit-bf16": "bf16"}.get(config) or resolve_precision("auto", device)
        autocast = autocast_for(precision, device)
        model, _ = lorakit.models.load_model(
            args.model, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        torch.manual_seed(0)
        model = lorakit.get_peft_model(model, lorakit.LoraConfig(**lora))
        speed_up(model)  # the trainer's settings: lorakit attention where supported

        def loss_of_batch():
            with autocast():
                loss, n = loss_sum(model, batch)
            return loss / n
    else:
        import peft
        from transformers import AutoModelForCausalLM

        precision = "bf16" if config == "peft-bf16" else "fp32"
        model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(args.model), dtype=torch.float32).to(device)
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))

        def loss_of_batch():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss

    model.train()
    # every config gets the same (fused where available) AdamW: the comparison is forward and backward
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step() -> torch.Tensor:
        loss = loss_of_batch()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, precision, int((batch["labels"][:, 1:] != -100).sum())


def run_config(config: str, args, **lora_extra) -> dict:
    """Warm-up, timed steps, then one counted step; what one worker process prints."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step, precision, label_tokens = build_step(config, args, device, **lora_extra)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        sync(device)
        started = time.perf_counter()
        losses.append(step())
        sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - started)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    cuda_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None

    missing = {op: formula for op, formula in CPU_ATTENTION.items() if op not in flop_registry}
    added = {str(op) for op in missing}
    with FlopCounterMode(display=False, custom_mapping=missing) as counter:
        step()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    attention = {op for op in by_op if "attention" in op}
    how = ("FlopCounterMode" if attention - added else
           "added with torch's SDPA formulas (FlopCounterMode does not count the CPU kernel)" if attention
           else "no attention kernel seen (the math path is counted as matmuls)")
    return {
        "config": config, "precision": precision, "device": str(device), "threads": torch.get_num_threads(),
        "label_tokens": label_tokens, "losses": [float(x) for x in losses], "first_loss": float(losses[0]),
        "step_s": times, "rss_mb": rss_mb, "cuda_peak_mb": cuda_peak_mb,
        "flops": int(counter.get_total_flops()), "flops_by_op": by_op,
        "attention_flops": sum(by_op[op] for op in attention), "attention_counted_by": how,
    }


def matmul_peak(args) -> dict:
    """FLOP/s of torch.mm, fp32 and bf16: per shape the median of --matmul-reps, then the max."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {}
        for m, k, n in MATMUL_SHAPES:
            a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
            times = []
            with torch.inference_mode():
                for i in range(2 + args.matmul_reps):
                    sync(device)
                    started = time.perf_counter()
                    torch.mm(a, b)  # (m, n)
                    sync(device)
                    if i >= 2:
                        times.append(time.perf_counter() - started)
            rates[f"{m}x{k}x{n}"] = 2 * m * k * n / statistics.median(times)
        result[name] = {"peak_flops": max(rates.values()), "by_shape": rates}
    return result


def spawn(worker: str, args) -> dict:
    """Run ``--worker`` in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, __file__, *args.argv, "--worker", worker]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"worker {worker} failed with exit code {done.returncode}: {' '.join(cmd)}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]], peaks: dict, tokens: int) -> dict:
    """Per config: all step times, their median, tokens/s, peak memory, FLOPs, losses, ratios."""
    out = {}
    for config, results in runs.items():
        median = statistics.median(t for r in results for t in r["step_s"])
        first = results[0]
        cuda = [r["cuda_peak_mb"] for r in results if r["cuda_peak_mb"] is not None]
        out[config] = {
            "precision": first["precision"], "device": first["device"], "threads": first["threads"],
            "label_tokens": first["label_tokens"],
            "step_s": [r["step_s"] for r in results], "median_step_s": median, "tokens_per_s": tokens / median,
            "rss_mb": max(r["rss_mb"] for r in results), "cuda_peak_mb": max(cuda) if cuda else None,
            "first_loss": [r["first_loss"] for r in results], "losses": [r["losses"] for r in results],
            "flops_per_step": first["flops"], "flops_by_op": first["flops_by_op"],
            "attention_flops": first["attention_flops"], "attention_counted_by": first["attention_counted_by"],
            "achieved_flops": first["flops"] / median,
            "pct_of_matmul_peak": 100 * first["flops"] / median / peaks[first["precision"]]["peak_flops"],
        }
    for config, row in out.items():
        for base in ("peft-fp32", "peft-bf16"):
            if base in out:
                row[f"vs_{base}"] = row["tokens_per_s"] / out[base]["tokens_per_s"]
    return out


def print_table(summary: dict, peaks: dict) -> None:
    cuda = any(r["cuda_peak_mb"] is not None for r in summary.values())
    head = ["config", "prec", "tokens/s", "step s", "vs fp32", "vs bf16", "RSS MB", *(["GPU MB"] if cuda else []),
            "loss@1", "GFLOP/step", "GFLOP/s", "% peak"]
    rows = []
    for config, r in summary.items():
        ratio = [f"{r[k]:.2f}x" if k in r else "-" for k in ("vs_peft-fp32", "vs_peft-bf16")]
        rows.append([config, r["precision"], f"{r['tokens_per_s']:.1f}", f"{r['median_step_s']:.3f}", *ratio,
                     f"{r['rss_mb']:.0f}", *([f"{r['cuda_peak_mb']:.0f}"] if cuda else []),
                     f"{r['first_loss'][0]:.4f}", f"{r['flops_per_step'] / 1e9:.2f}",
                     f"{r['achieved_flops'] / 1e9:.1f}", f"{r['pct_of_matmul_peak']:.1f}"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    for line in [head, *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(line, widths)))
    print("matmul peak: " + ", ".join(f"{k} {v['peak_flops'] / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    losses = [r["first_loss"][0] for r in summary.values()]
    print(f"first-step losses (same weights, same batch) differ by at most {max(losses) - min(losses):.4f}")
    print("attention FLOPs: " + "; ".join(sorted({r["attention_counted_by"] for r in summary.values()})))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "matmul":
        print(json.dumps(matmul_peak(args)))
        return
    if args.worker:
        print(json.dumps(run_config(args.worker, args, **({"use_dora": True} if args.dora else {}))))
        return

    peaks = spawn("matmul", args)
    runs: dict[str, list[dict]] = {c: [] for c in args.configs}
    for round_ in range(args.rounds):
        for config in args.configs:
            print(f"round {round_ + 1}/{args.rounds}: {config}", flush=True)
            runs[config].append(spawn(config, args))
    summary = summarize(runs, peaks, args.batch * args.seq)
    print_table(summary, peaks)
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
