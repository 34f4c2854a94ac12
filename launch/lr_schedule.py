"""The LLaMA learning-rate recipe: linear warmup, then cosine decay to ``min_lr_ratio`` of the peak."""
from __future__ import annotations

import math


def lr_multiplier(step: int, total_steps: int, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak LR for the optimizer update number ``step`` (0-based).

    Warmup: ``(step + 1) / warmup`` (the first update already moves the weights); then cosine
    from 1 at the end of warmup to ``min_ratio`` at ``total_steps``, and ``min_ratio`` after that.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_for(train) -> "callable":
    """``step -> multiplier`` for a TrainConfig (warmup_steps, steps, min_lr_ratio)."""
    return lambda step: lr_multiplier(step, train.steps, train.warmup_steps, train.min_lr_ratio)
