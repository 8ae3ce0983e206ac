"""One QLoRA training step of a Llama-3.2-1B-shaped model: the base in bf16, NF4 and int8, lorakit beside PEFT.

The model has meta-llama/Llama-3.2-1B's real config (`distributed.LLAMA_3_2_1B`) and seeded random
weights (nothing is downloaded), built once into --model-dir as bf16 safetensors, with the default
model's tokenizer files beside them (`load_model` wants a tokenizer; the benchmark feeds token ids).
A fixed seeded batch of --batch x --seq random token ids, labels on every position; LoRA r=--rank,
alpha=2r, dropout 0 on all seven projections, the adapter seeded alike on both sides; AdamW lr 1e-4
(the same fused kernel on both sides). A step is forward, loss, backward, optimizer step, zero_grad,
under torch.autocast("cpu", bf16) on both sides. Sides, each on each base:

  lorakit   load_model(dir, dtype=bf16, quantize=base), lorakit.get_peft_model, lorakit.speedup(model,
            bf16=True) (fused RMSNorm, lorakit's attention, the loss head on label positions)
  peft      AutoModelForCausalLM.from_pretrained(dir, dtype=bf16, quantization_config=bnb_config(base),
            device_map as load_model sets it), peft.get_peft_model

Neither side calls prepare_model_for_kbit_training (it would cast the embeddings to fp32 and turn
on gradient checkpointing, on both sides alike). Each configuration runs in its own process (the
model is built in one too, so that no process inherits another's memory): its memory when the model
is ready (current RSS, the part of it that is file pages, and the peak so far: loading may quantize
from a bf16 copy), its peak over the whole run (ru_maxrss), and the steps' own peak (the kernel's
high-water mark, reset when the model is ready). The file pages are the bf16 safetensors file, still
mapped while a tensor read from it lives (the embedding): clean pages the kernel may drop, but RSS,
and so every peak, counts them. lorakit's quantized load copies its unquantized tensors out of the
file (`lorakit.models.quantized.release_file`), which unmaps it; transformers' own load, the PEFT
side's, keeps it mapped. tokens/s = B x T x steps / their time, after
--warmup untimed steps; the first step's loss (the adapter's B starts at zero, so it is the base's
loss) should agree closely between the sides on a base (lorakit's attention and loss head round
differently in bf16).

    python bench/qlora.py                # the benchmark: 6 configs of the 1.2B model (see --help)
    OMP_NUM_THREADS=1 python bench/qlora.py --tiny --steps 1 --json /tmp/qlora-tiny.json   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from distributed import LLAMA_3_2_1B  # noqa: E402  (bench/distributed.py: the real config's values)
from machine import machine, write_result  # noqa: E402  (bench/machine.py)

SIDES = ("lorakit", "peft")
BASES = ("bf16", "nf4", "int8")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TINY = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
"""--tiny: Llama-3.2-1B's config with these instead (head_dim 64 and the vocabulary kept)."""
TOKENIZER_FILES = ("tokenizer", "special_tokens", "vocab", "merges", "chat_template")
"""Names (prefixes) of the default model's tokenizer files copied beside the weights."""
FAILED_TAIL = 4000
"""Characters of a worker's stderr kept in the results (and shown when it failed)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="a smoke-test model: hidden 256, 2 layers, 4 heads (the vocabulary kept)")
    p.add_argument("--layers", type=int, default=None,
                   help="override the number of decoder layers (full widths, fewer layers: a quick estimate)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="where the random model is built once and reused "
                        "(default /tmp/lorakit-bench/qlora-<shape>-seed<seed>)")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    p.add_argument("--bases", default=",".join(BASES), help=f"comma list of {', '.join(BASES)}")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--rank", type=int, default=16, help="LoRA r; lora_alpha is 2r")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    p.add_argument("--seed", type=int, default=0, help="the model's weights, the batch and the adapters")
    p.add_argument("--json", default="bench/results/qlora.json", help="where the results go")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    args.bases = [b.strip() for b in args.bases.split(",") if b.strip()]
    problems = [f"unknown side {s!r}" for s in args.sides if s not in SIDES]
    problems += [f"unknown base {b!r}" for b in args.bases if b not in BASES]
    problems += [f"--{k} must be 1 or more" for k in ("batch", "seq", "steps", "rank", "layers")
                 if getattr(args, k) is not None and getattr(args, k) < 1]
    if args.warmup < 0:
        problems.append("--warmup must be 0 or more")
    if problems:
        p.error("; ".join(problems) + f" (sides: {', '.join(SIDES)}; bases: {', '.join(BASES)})")
    args.config = model_config(args)
    if args.model_dir is None:
        shape = "tiny" if args.tiny else "llama-3.2-1b"
        layers = f"-{args.layers}-layers" if args.layers else ""
        args.model_dir = Path("/tmp/lorakit-bench") / f"qlora-{shape}{layers}-seed{args.seed}"
    return args


def model_config(args) -> dict:
    """The config.json values of the benchmark's model."""
    config = {**LLAMA_3_2_1B, **(TINY if args.tiny else {})}
    if args.layers:
        config["num_hidden_layers"] = args.layers
    return config


# --------------------------------------------------------------------------- memory (Linux)

def _status_mb(field: str) -> float | None:
    """A line of /proc/self/status (``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile``), in MiB (None
    where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _reset_peak() -> bool:
    """Reset this process's high-water mark (VmHWM) to its current RSS (Linux 4.0+: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------- workers

def build(args) -> dict:
    """The random model in ``args.model_dir`` (built once: in a temporary folder, then renamed)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lorakit.models import resolve_model_dir

    path, wanted = args.model_dir, LlamaConfig(**args.config)
    if (path / "config.json").is_file():
        saved = LlamaConfig.from_pretrained(path).to_dict()
        different = [f"{k}: {saved.get(k)} there, {v} wanted" for k, v in wanted.to_dict().items()
                     if k not in ("dtype", "architectures", "transformers_version") and saved.get(k) != v]
        if different:
            raise SystemExit(f"{path} holds another model ({'; '.join(different)}); delete it or pass another "
                             "--model-dir")
        return {"built": False, "path": str(path)}
    started = time.perf_counter()
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(wanted, dtype=torch.bfloat16)
    model.save_pretrained(tmp, safe_serialization=True)
    source = resolve_model_dir()  # the default model's tokenizer: the ids are random anyway
    for name in os.listdir(source):
        if name.startswith(TOKENIZER_FILES):
            shutil.copy(source / name, tmp / name)
    tmp.rename(path)
    return {"built": True, "path": str(path), "build_s": time.perf_counter() - started,
            "parameters": sum(p.numel() for p in model.parameters())}


def load(side: str, base: str, args):
    """The LoRA-wrapped model of one configuration, in training mode."""
    import torch

    from lorakit.models.quantized import bnb_config

    quantize = None if base == "bf16" else base
    lora = dict(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                task_type="CAUSAL_LM")
    if side == "lorakit":
        import lorakit
        from lorakit.models import load_model

        model, _ = load_model(args.model_dir, dtype=torch.bfloat16, quantize=quantize)
        torch.manual_seed(args.seed)
        model = lorakit.get_peft_model(model, lorakit.LoraConfig(**lora))
        lorakit.speedup(model, bf16=True)  # the same precision as the peft side's autocast, on any CPU
    else:
        import peft
        from transformers import AutoModelForCausalLM

        options = {}
        if quantize is not None:  # as load_model loads a quantized base
            options = {"quantization_config": bnb_config(quantize, torch.bfloat16), "device_map": {"": "cpu"}}
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16, use_safetensors=True,
                                                     local_files_only=True, **options)
        torch.manual_seed(args.seed)
        model = peft.get_peft_model(model, peft.LoraConfig(**lora))
    return model.train()


def run_config(side: str, base: str, args) -> dict:
    """Load, warm up, time the steps; what one worker process prints."""
    import torch

    from lorakit.train.fast import make_optimizer
    from lorakit.plugins import quantized_base

    started = time.perf_counter()
    model = load(side, base, args)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, lr=1e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, args.config["vocab_size"], (args.batch, args.seq), generator=generator)  # (B, T)
    load_s = time.perf_counter() - started
    load_rss, load_peak = _status_mb("VmRSS"), _max_rss_mb()
    load_anon, load_file = _status_mb("RssAnon"), _status_mb("RssFile")
    reset = _reset_peak()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=input_ids, labels=input_ids).loss  # mean over B x (T-1) next tokens
        loss.backward()
        loss = loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {
        "side": side, "base": base, "threads": torch.get_num_threads(), "load_s": load_s,
        "load_rss_mb": load_rss, "load_anon_mb": load_anon, "load_file_mb": load_file, "load_peak_mb": load_peak,
        "peak_rss_mb": _max_rss_mb(),
        "step_peak_mb": _status_mb("VmHWM") if reset else None,
        "step_s": times, "tokens_per_s": args.batch * args.seq * len(times) / sum(times),
        "first_loss": losses[0], "losses": losses,
        "trainable": sum(p.numel() for p in trainable),
        "quantized_layers": sum(quantized_base(m) is not None for m in model.modules()),
        "speedup": getattr(model, "lorakit_speedup", None),  # lorakit.speedup's lines: what applied
    }


def spawn(worker: str, args) -> dict:
    """Run ``--worker`` in a fresh process; its last stdout line is its JSON result. A failure comes
    back as ``{"error": ...}`` with the tail of the worker's stderr (and ``failure``: that tail framed
    for printing)."""
    cmd = [sys.executable, __file__, *args.argv, "--worker", worker]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = done.stdout.strip().splitlines()
    if done.returncode == 0 and lines:
        try:  # the stderr kept: bitsandbytes' and transformers' warnings, if any
            return {**json.loads(lines[-1]), "wall_s": wall, "stderr_tail": done.stderr[-FAILED_TAIL:]}
        except json.JSONDecodeError:
            pass
    tail = (done.stderr.strip() or done.stdout.strip())[-FAILED_TAIL:]
    failure = (f"--- worker {worker} failed (exit code {done.returncode}) after {wall:.0f} s: {' '.join(cmd)}\n"
               f"{tail}\n--- end of {worker}'s stderr\n")
    return {"error": f"exit code {done.returncode}", "stderr_tail": tail, "wall_s": wall, "failure": failure}


# --------------------------------------------------------------------------- report

def ratios(runs: list[dict]) -> dict:
    """Per base with both sides done: lorakit / PEFT tokens/s (above 1: lorakit faster) and peak
    memory (below 1: lorakit smaller)."""
    done = {(r["side"], r["base"]): r for r in runs if "error" not in r}
    out = {}
    for base in BASES:
        k, p = done.get(("lorakit", base)), done.get(("peft", base))
        if k and p:
            out[base] = {"tokens_per_s": k["tokens_per_s"] / p["tokens_per_s"],
                         "peak_rss": k["peak_rss_mb"] / p["peak_rss_mb"],
                         "step_peak": (k["step_peak_mb"] / p["step_peak_mb"]
                                       if k["step_peak_mb"] and p["step_peak_mb"] else None),
                         "first_loss_diff": abs(k["first_loss"] - p["first_loss"])}
    return out


def _table(head: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    for line in [head, *rows]:
        print("  ".join(x.rjust(w) for x, w in zip(line, widths)))


def print_report(runs: list[dict], by_base: dict) -> None:
    mb = lambda x: "-" if x is None else f"{x:.0f}"  # noqa: E731
    rows = []
    for r in runs:
        if "error" in r:
            rows.append([r["side"], r["base"], "FAILED", "", "", "", "", "", "", f"{r['wall_s']:.0f}"])
            continue
        rows.append([r["side"], r["base"], mb(r["load_rss_mb"]), mb(r["load_file_mb"]), mb(r["load_peak_mb"]),
                     mb(r["peak_rss_mb"]),
                     mb(r["step_peak_mb"]), f"{r['tokens_per_s']:.1f}", f"{r['first_loss']:.4f}",
                     f"{r['wall_s']:.0f}"])
    _table(["side", "base", "load RSS MiB", "of it file", "load peak MiB", "peak RSS MiB", "step peak MiB", "tokens/s",
            "first loss", "wall s"], rows)
    if by_base:
        print("\nlorakit / PEFT (tokens/s above 1 and memory below 1 favour lorakit)")
        _table(["base", "tokens/s", "peak RSS", "step peak", "|first loss diff|"],
               [[base, f"{x['tokens_per_s']:.2f}x", f"{x['peak_rss']:.2f}x",
                 "-" if x["step_peak"] is None else f"{x['step_peak']:.2f}x", f"{x['first_loss_diff']:.2e}"]
                for base, x in by_base.items()])


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker == "build":
        print(json.dumps(build(args)))
        return
    if args.worker:
        side, base = args.worker.split(":")
        print(json.dumps(run_config(side, base, args)))
        return

    started = time.perf_counter()
    print(f"model: {args.model_dir}", flush=True)
    model = spawn("build", args)  # its own process too: the parent stays small (an exec'd child's
    if "error" in model:          # ru_maxrss starts at its parent's)
        raise SystemExit(f"{model['failure']}could not build the model in {args.model_dir} (above)")
    if model["built"]:
        print(f"built {model['parameters']:,} parameters in {model['build_s']:.0f} s", flush=True)
    runs = []
    for base in args.bases:
        for side in args.sides:
            print(f"{side} on {base} ...", end=" ", flush=True)
            result = {"side": side, "base": base, **spawn(f"{side}:{base}", args)}
            runs.append(result)
            if "error" in result:
                print(f"FAILED ({result['error']}; its stderr follows)", flush=True)
                sys.stderr.write(result.pop("failure"))
                sys.stderr.flush()
            else:
                print(f"{result['tokens_per_s']:.1f} tokens/s, peak {result['peak_rss_mb']:.0f} MiB, "
                      f"load {result['load_s']:.0f} s, step {sum(result['step_s']) / len(result['step_s']):.1f} s, "
                      f"{result['wall_s']:.0f} s in all", flush=True)
    print()
    by_base = ratios(runs)
    print_report(runs, by_base)
    wall = time.perf_counter() - started
    print(f"\n{len(runs)} configurations in {wall:.0f} s")
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                if k not in ("worker", "argv", "json")}
    write_result(args.json, {"benchmark": "qlora", "machine": machine(), "settings": settings,
                             "smoke": args.tiny or args.layers is not None or args.steps < 3,
                             "model": model, "wall_s": wall, "runs": runs, "lorakit_vs_peft": by_base})
    failed = [f"{r['side']}:{r['base']}" for r in runs if "error" in r]
    if failed:
        raise SystemExit(f"{len(failed)} configuration(s) failed: {', '.join(failed)} (their stderr is above "
                         f"and in {args.json})")


if __name__ == "__main__":
    main()
