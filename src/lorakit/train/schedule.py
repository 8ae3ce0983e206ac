"""The learning-rate schedule: linear warm-up, then cosine decay. A pure function of the step."""

from __future__ import annotations

import math

__all__ = ["lr_at", "warmup_steps"]


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return int(math.ceil(total_steps * warmup_ratio))


def lr_at(step: int, *, peak: float, total_steps: int, warmup: int, min_ratio: float = 0.1) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``peak * (step + 1) / warmup`` for the first ``warmup`` steps; then cosine from
    ``peak`` down to ``peak * min_ratio`` at the last step.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total_steps - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
