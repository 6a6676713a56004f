"""Learning-rate schedules as pure functions of the step.

The scheduler keeps no state of its own: the multiplier of step `s` (1-based, the step about to be
applied) is computed from the config, so resuming at any step reproduces the exact learning rate.

    warmup:   linear from 1/warmup to 1 over `warmup_steps`
    cosine:   then half a cosine from 1 down to `min_lr_ratio` at `max_steps`
    wsd:      then flat at 1, and a linear decay to `min_lr_ratio` over the last `decay_fraction`
    constant: then flat at 1
"""

from __future__ import annotations

import math

from lmforge.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig, max_steps: int | None = None) -> float:
    """The share of the peak learning rate used at optimizer step `step` (1-based)."""
    total = max_steps or cfg.max_steps
    warmup = cfg.warmup_steps
    if warmup and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        span = max(1, total - warmup)
        progress = min(1.0, (step - warmup) / span)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # warmup-stable-decay
    decay_steps = max(1, round(cfg.decay_fraction * total))
    decay_start = total - decay_steps
    if step <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - floor) * progress
