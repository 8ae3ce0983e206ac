"""The planner: what LoRA will train and cost on a model, what to choose, and what a run did.

- `load_shape(model)`: a model's shape from a directory, config.json, GGUF header or built-in name.
- `estimate(model, config, ...)`: trainable parameters, adapter file size, training memory.
- `recommend(task, examples, shape, memory_gb)`: the lesson's advice, a reason for each choice.
- `make_plan(model, task, examples, ...)`: the recommendation beside the three presets, costed
  (per device with ``gpus=N``, ``strategy="ddp"`` or ``"fsdp"``).
- `advise_strategy(shape, settings, gpus=N)`: DDP or FSDP2 for N processes, and why.
- `inspect_adapter(dir)`: an adapter's config, sizes and per-layer learned-update norms.
- `diagnose(run_dir)`: a verdict on a run's loss curves, with evidence and changes to make.

Nothing here loads model weights; the core library does not import this package.
"""

from lorakit.plan.advice import Recommendation, recommend
from lorakit.plan.diagnosis import Diagnosis, diagnose, diagnose_metrics
from lorakit.plan.estimation import Estimate, estimate
from lorakit.plan.inspection import Inspection, ModuleUpdate, inspect_adapter
from lorakit.plan.memory import MemoryEstimate
from lorakit.plan.metrics import Metrics, read_metrics
from lorakit.plan.planner import Plan, make_plan
from lorakit.plan.shapes import ModelShape, ModuleShape
from lorakit.plan.sources import load_shape
from lorakit.plan.strategies import StrategyAdvice, advise_strategy
from lorakit.plan.targets import LoraSpec, TargetedModule

__all__ = [
    "ModelShape", "ModuleShape", "load_shape",
    "LoraSpec", "TargetedModule",
    "Estimate", "MemoryEstimate", "estimate",
    "Recommendation", "recommend", "Plan", "make_plan", "StrategyAdvice", "advise_strategy",
    "Inspection", "ModuleUpdate", "inspect_adapter",
    "Metrics", "read_metrics", "Diagnosis", "diagnose", "diagnose_metrics",
]
