"""The loss-spike and NaN guard, and the fault injection that exercises it.

Big training runs are watched by people who, when the loss jumps, roll back to the last clean
checkpoint, skip the data that caused it and go on, perhaps with a lower learning rate for a while.
`LossGuard` does that by rule:

  - it keeps the last `window` clean losses and their median and MAD (median absolute deviation,
    robust to the spikes it is looking for);
  - a step is bad if its loss or gradient norm is not finite, or if its loss is above
    median + threshold * spread, spread = max(1.4826 * MAD, min_rel_spread * median, min_abs_spread);
  - a bad step is never applied; the loop rolls back to the last checkpoint, discards
    `skip_batches` steps' worth of data when it reaches the offending step again, and multiplies
    the learning rate by `lr_factor` for `lr_cooldown_steps` steps;
  - after `max_rollbacks` rollbacks the next bad step stops the run (`TrainingDiverged`).

The statistic window rolls back with the checkpoint; the history (rollbacks, data to skip, lowered
learning rate, faults already injected) does not, so a rolled-back run does not repeat itself.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from typing import Any

from lmforge.config import GuardConfig, parse_inject
from lmforge.errors import UserError

# Below this many clean losses the median is not trusted to call a spike.
_MIN_SAMPLES = 10
# Scale that turns a MAD into a standard deviation for normally distributed values.
_MAD_TO_STD = 1.4826


class TrainingDiverged(UserError):
    """The guard ran out of rollbacks (or is disabled and saw a non-finite step)."""

    exit_code = 3


class LossGuard:
    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.losses: deque[float] = deque(maxlen=cfg.window)
        self.rollbacks = 0
        self.skip: dict[int, int] = {}  # step -> steps' worth of batches to discard before it
        self.low_lr_until = 0  # the learning rate is lowered up to and including this step

    def check(self, loss: float, grad_norm: float) -> str | None:
        """Why the step must not be applied ("nan_loss", "nan_grad", "spike"), or None."""
        if not math.isfinite(loss):
            return "nan_loss"
        if not math.isfinite(grad_norm):
            return "nan_grad"
        if self.cfg.enabled and len(self.losses) >= min(_MIN_SAMPLES, self.cfg.window):
            if loss > self.spike_limit():
                return "spike"
        return None

    def spike_limit(self) -> float:
        median = statistics.median(self.losses)
        mad = statistics.median(abs(x - median) for x in self.losses)
        spread = max(_MAD_TO_STD * mad, self.cfg.min_rel_spread * abs(median), self.cfg.min_abs_spread)
        return median + self.cfg.threshold * spread

    def observe(self, loss: float) -> None:
        """Record the loss of an applied (clean) step."""
        self.losses.append(loss)

    def lr_scale(self, step: int) -> float:
        return self.cfg.lr_factor if step <= self.low_lr_until else 1.0

    def batches_to_skip(self, step: int) -> int:
        return self.skip.get(step, 0)

    def rollback(self, step: int, reason: str) -> None:
        """Account for a rollback caused by `step`; raise if the run has used up its rollbacks."""
        if not self.cfg.enabled:
            raise TrainingDiverged(
                f"step {step}: {reason.replace('_', ' ')} and guard.enabled=false; stopping without applying it"
            )
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingDiverged(
                f"step {step}: {reason.replace('_', ' ')} after {self.rollbacks} rollbacks "
                f"(guard.max_rollbacks={self.cfg.max_rollbacks}); the run is diverging - lower "
                "train.lr or raise guard.max_rollbacks"
            )
        self.rollbacks += 1
        self.skip[step] = self.skip.get(step, 0) + self.cfg.skip_batches
        if self.cfg.lr_factor < 1.0:
            self.low_lr_until = step + self.cfg.lr_cooldown_steps

    # The statistic and the history are saved together but restored separately on rollback.
    def state_dict(self) -> dict[str, Any]:
        return {
            "losses": list(self.losses),
            "rollbacks": self.rollbacks,
            "skip": {str(k): v for k, v in self.skip.items()},
            "low_lr_until": self.low_lr_until,
        }

    def load_state_dict(self, state: dict[str, Any], statistic_only: bool = False) -> None:
        self.losses = deque(state["losses"], maxlen=self.cfg.window)
        if not statistic_only:
            self.rollbacks = state["rollbacks"]
            self.skip = {int(k): v for k, v in state["skip"].items()}
            self.low_lr_until = state["low_lr_until"]


class FaultInjector:
    """`debug.inject` faults, each fired only the first time its step runs."""

    SPIKE_FACTOR = 1000.0

    def __init__(self, spec: str):
        self.pending = set(parse_inject(spec)) if spec else set()
        self.fired: set[tuple[str, int]] = set()

    def due(self, kind: str, step: int) -> bool:
        key = (kind, step)
        if key in self.pending and key not in self.fired:
            self.fired.add(key)
            return True
        return False

    def loss_factor(self, step: int) -> float:
        """What the loss (and so the gradients) of `step` is multiplied by: 1, x1000 or NaN."""
        if self.due("nan", step):
            return math.nan
        if self.due("spike", step):
            return self.SPIKE_FACTOR
        return 1.0

    def state_dict(self) -> list[str]:
        return sorted(f"{kind}@{step}" for kind, step in self.fired)

    def load_state_dict(self, fired: list[str]) -> None:
        self.fired = {(k, int(s)) for k, s in (item.split("@") for item in fired)}
