"""Read a run's metrics.jsonl the way a crashed or resumed run leaves it.

A run killed mid-write leaves a torn last line; a resumed run logs the steps after its checkpoint
a second time. We skip lines that are not JSON objects (and count them) and keep the newest record
of each step, which is what the resumed run's curve really is.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Metrics:
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped_lines: int = 0

    def train(self, key: str) -> list[tuple[int, float]]:
        """(step, value) for every step that logged `key`, newest record of a step winning."""
        return self._series(key)

    def val(self, key: str = "val_loss") -> list[tuple[int, float]]:
        return self._series(key)

    def _series(self, key: str) -> list[tuple[int, float]]:
        by_step: dict[int, float] = {}
        for r in self.records:
            if "event" in r:  # a rollback's loss is not a point of the curve
                continue
            value, step = r.get(key), r.get("step")
            if isinstance(step, int) and _is_number(value) and math.isfinite(value):
                by_step[step] = float(value)
        return sorted(by_step.items())

    def events(self) -> list[dict[str, Any]]:
        """Resume, rollback, budget and stop events the training loop logged."""
        return [r for r in self.records if "event" in r]

    def samples(self) -> list[dict[str, Any]]:
        """Generations the training loop logged at intervals (records with a "sample")."""
        return [r for r in self.records if "sample" in r]

    def keys(self, prefix: str) -> list[str]:
        """Every numeric key starting with `prefix` (e.g. "eval/"), in the order first logged."""
        seen: dict[str, None] = {}
        for r in self.records:
            for key, value in r.items():
                if key.startswith(prefix) and _is_number(value):
                    seen.setdefault(key, None)
        return list(seen)

    def last(self, key: str) -> float | None:
        points = self._series(key)
        return points[-1][1] if points else None


def read_metrics(path: Path) -> Metrics:
    metrics = Metrics()
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                metrics.skipped_lines += 1
                continue
            if isinstance(record, dict):
                metrics.records.append(record)
            else:
                metrics.skipped_lines += 1
    return metrics


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
