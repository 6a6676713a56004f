"""Learning-rate schedules as pure functions of the step.

The scheduler keeps no state of its own: the multiplier of step `s` (1-based, the step about to be
applied) is computed from the config, so resuming at any step reproduces the exact learning rate.
A run sized to a time budget may change max_steps while it runs; its cosine then carries an
`anchor` (step, progress reached there), so the new length only changes how fast the rest of the
curve is walked, never the learning rate already reached (see docs/guide/pretraining.md).

    warmup:   linear from 1/warmup to 1 over `warmup_steps`
    cosine:   then half a cosine from 1 down to `min_lr_ratio` at `max_steps`
    wsd:      then flat at 1, and a linear decay to `min_lr_ratio` over the last `decay_fraction`
    constant: then flat at 1
"""

from __future__ import annotations

import math

from lmforge.config import TrainConfig

Anchor = tuple[int, float]  # (step, share of the cosine walked at that step)


def lr_multiplier(step: int, cfg: TrainConfig, max_steps: int | None = None,
                  anchor: Anchor | None = None) -> float:
    """The share of the peak learning rate used at optimizer step `step` (1-based)."""
    total = max_steps or cfg.max_steps
    warmup = cfg.warmup_steps
    if warmup and step <= warmup:
        return step / warmup
    if cfg.schedule == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        progress = decay_progress(step, warmup, total, anchor)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # warmup-stable-decay
    decay_start = wsd_decay_start(cfg, total)
    decay_steps = total - decay_start
    if step <= decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / decay_steps)
    return 1.0 - (1.0 - floor) * progress


def decay_progress(step: int, warmup: int, total: int, anchor: Anchor | None = None) -> float:
    """Share of the cosine walked at `step`: 0 at the end of warmup, 1 at `total`, linear in
    between; with an anchor, linear from the anchor's progress at its step to 1 at `total`."""
    start, done = (warmup, 0.0) if anchor is None or anchor[0] <= warmup else anchor
    return min(1.0, max(0.0, done + (1.0 - done) * (step - start) / max(1, total - start)))


def wsd_decay_start(cfg: TrainConfig, total: int) -> int:
    """The last step at full learning rate of the warmup-stable-decay schedule."""
    return total - max(1, round(cfg.decay_fraction * total))
