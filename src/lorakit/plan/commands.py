"""`lorakit plan`, `lorakit inspect`, `lorakit diagnose`: parse, call `lorakit.plan`, print."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lorakit.checks import QUANTIZATIONS
from lorakit.plan import advice as _advice
from lorakit.plan import diagnosis as _diagnosis
from lorakit.plan import inspection as _inspection
from lorakit.plan.advice import TASKS
from lorakit.plan.diagnosis import HIGH_LOSS, diagnose
from lorakit.plan.inspection import inspect_adapter
from lorakit.plan.planner import make_plan
from lorakit.plan.plot import plot_diagnosis
from lorakit.plan.report import format_diagnosis, format_inspection, format_plan
from lorakit.plan.sharding import STRATEGIES

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the planner's sub-commands to ``lorakit``'s parser."""
    p = subparsers.add_parser(
        "plan", help="recommend rank, alpha, targets and training settings, and what they cost",
        description=_advice.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, metavar="M",
                   help="a model directory, config.json, .gguf file or built-in name such as "
                        "Llama-3-8B (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", required=True, choices=list(TASKS),
                   help="; ".join(f"{k}: {v}" for k, v in TASKS.items()))
    p.add_argument("--examples", required=True, type=int, metavar="N",
                   help="the number of training examples")
    p.add_argument("--memory-gb", type=float, default=None, metavar="X",
                   help="memory available for training, in GiB (each GPU's memory, or on cpu the "
                        "machine's RAM, which the --gpus processes share)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of the frozen weights and activations (default bfloat16)")
    p.add_argument("--seq-len", type=int, default=512, metavar="L",
                   help="tokens per training sequence (default 512)")
    p.add_argument("--batch-size", type=int, default=4, metavar="B",
                   help="sequences per step, per process (default 4)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="processes, one per GPU (or CPU processes), as lorakit train --nproc N; "
                        "the memory is then per device (default 1)")
    p.add_argument("--strategy", choices=list(STRATEGIES), default="ddp",
                   help="how several processes share the model, as lorakit train --strategy: ddp "
                        "(each device holds the whole frozen model) or fsdp (FSDP2 shards it); the "
                        "plan says which suits (default ddp)")
    p.add_argument("--quantize", choices=list(QUANTIZATIONS), default=None,
                   help="plan for a frozen base whose linear layers are stored in 4 or 8 bits "
                        "(QLoRA with bitsandbytes), as lorakit train --quantize: nf4 or fp4 (4-bit, "
                        "double-quantized constants) or int8 (LLM.int8, fp32 row scales). The memory "
                        "then counts the quantized weights and their quantization constants, the "
                        "embedding, norms and output head in --dtype (also the compute dtype), and "
                        "the largest layer's transient dequantization buffer; several --gpus use "
                        "ddp (FSDP2 does not shard quantized weights). Any other value is refused "
                        "(default: no quantization, the whole base in --dtype)")
    p.add_argument("--json", action="store_true", help="print the plan as a JSON document")
    p.set_defaults(func=run_plan)

    p = subparsers.add_parser(
        "inspect", help="what an adapter holds and which layers changed most",
        description=_inspection.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR",
                   help="a directory with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--json", action="store_true", help="print the inspection as a JSON document")
    p.set_defaults(func=run_inspect)

    p = subparsers.add_parser(
        "diagnose", help="read a run's loss curves and say what to change",
        description=_diagnosis.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (or its metrics.jsonl)")
    p.add_argument("--plot", default=None, metavar="PATH",
                   help="where to draw the curves (default: RUN_DIR/diagnosis.png)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the curves")
    p.add_argument("--high-loss", type=float, default=HIGH_LOSS, metavar="X",
                   help=f"a plateau above this loss counts as underfitting (default {HIGH_LOSS:g})")
    p.add_argument("--json", action="store_true", help="print the diagnosis as a JSON document")
    p.set_defaults(func=run_diagnose)


def run_plan(args: argparse.Namespace) -> int:
    plan = make_plan(args.model, args.task, args.examples, memory_gb=args.memory_gb,
                     device=args.device, dtype=args.dtype, seq_len=args.seq_len,
                     batch_size=args.batch_size, gpus=args.gpus, strategy=args.strategy,
                     quantize=args.quantize)
    print(_json(plan.to_dict()) if args.json else format_plan(plan))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    inspection = inspect_adapter(args.adapter_dir)
    print(_json(inspection.to_dict()) if args.json else format_inspection(inspection))
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    diagnosis = diagnose(args.run_dir, high_loss=args.high_loss)
    plot = None
    if not args.no_plot:
        default = Path(diagnosis.metrics.path).parent / "diagnosis.png"
        plot = str(plot_diagnosis(diagnosis, args.plot or default))
    if args.json:
        print(_json(diagnosis.to_dict() | {"plot": plot}))
    else:
        print(format_diagnosis(diagnosis, plot))
    return 0


def _json(data: Any) -> str:
    """Strict JSON: NaN and Inf become null."""
    return json.dumps(_finite(data), indent=2)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
