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
are bench/train_step.py's own functions; only the model building differs. Writes --json.

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


def build_step(config: str, args, device: torch.device):
    """(step function returning the loss, precision, label tokens) for one DoRA config."""
    import lorakit
    from lorakit.models import load_tokenizer, resolve_model_dir
    from lorakit.train.fast import make_optimizer

    batch = train_step.fixed_batch(load_tokenizer(train_step.MODEL), args.batch, args.seq, device)
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=train_step.TARGETS,
                task_type="CAUSAL_LM", use_dora=True)
    precision = config.rsplit("-", 1)[1]
    if config.startswith("lorakit"):
        from lorakit.train.evaluate import loss_sum
        from lorakit.train.fast import speed_up
        from lorakit.train.loop import autocast_for

        autocast = autocast_for(precision, device)
        model, _ = lorakit.models.load_model(
            train_step.MODEL, device=device, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
        torch.manual_seed(0)
        model = lorakit.get_peft_model(model, lorakit.LoraConfig(**lora))
        speed_up(model)

        def loss_of_batch():
            with autocast():
                loss, n = loss_sum(model, batch)
            return loss / n
    else:
        import peft
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(resolve_model_dir(train_step.MODEL),
                                                     dtype=torch.float32).to(device)
        torch.manual_seed(0)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))

        def loss_of_batch():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"]).loss

    model.train()
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)

    def step() -> torch.Tensor:
        loss = loss_of_batch()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, precision, int((batch["labels"][:, 1:] != -100).sum())


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
        train_step.build_step = build_step  # run_config times what build_step builds: DoRA's
        print(json.dumps(train_step.run_config(args.worker, args)))
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
