"""Stage records: what each pipeline stage was run on and what it produced (RUN/stages.json).

A stage is skipped when its record says it completed on the same inputs and its outputs are still
the ones it recorded. A stage's inputs are the config sections it reads plus the records of the
stages it builds on (their inputs hash and output fingerprint), so a change anywhere reruns that
stage and everything downstream of it, and nothing upstream.

    {"version": 1,
     "stages": {"data": {"status": "complete", "inputs_hash": "...", "inputs": {...},
                         "outputs": "sha256 of the stage's key artefact",
                         "started_at": "...", "finished_at": "...", "seconds": 12.3,
                         "attempts": 1}, ...}}

Records are written atomically when a stage starts ("running") and when it completes, so a killed
run leaves at worst a "running" record, which is never mistaken for a finished stage. A stage that
stopped on a signal or an error adds the seconds it ran to its record's `spent_s`, which an attempt
on the same inputs carries on (the budget split takes them off the stage's share); a stage killed
outright (SIGKILL) cannot count that attempt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Any

from lmforge.atomic import atomic_write_json

VERSION = 1


def inputs_hash(inputs: dict[str, Any]) -> str:
    """A stable hash of a JSON-serialisable description of a stage's inputs."""
    canonical = json.dumps(inputs, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class StageRecords:
    """RUN/stages.json, read once and rewritten atomically on every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, Any]] = {}
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") == VERSION:
                self.stages = data.get("stages", {})

    def get(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def is_current(self, name: str, digest: str) -> bool:
        """Did `name` complete on inputs hashing to `digest`?"""
        record = self.stages.get(name)
        return bool(record and record.get("status") == "complete" and record.get("inputs_hash") == digest)

    def started(self, name: str, digest: str, inputs: dict[str, Any]) -> None:
        previous = self.stages.get(name) or {}
        same_inputs = previous.get("inputs_hash") == digest
        self.stages[name] = {
            "status": "running",
            "inputs_hash": digest,
            "inputs": inputs,
            "started_at": now(),
            "attempts": previous.get("attempts", 0) + 1 if same_inputs else 1,
            "spent_s": self.spent_s(name) if same_inputs else 0.0,
        }
        self._save()

    def spent_s(self, name: str) -> float:
        """Seconds the earlier attempts of an unfinished stage ran (0 for a finished one)."""
        record = self.stages.get(name) or {}
        return float(record.get("spent_s", 0.0)) if record.get("status") == "running" else 0.0

    def stopped(self, name: str, seconds: float) -> None:
        """The attempt of `name` that started last ended unfinished after `seconds`."""
        record = self.stages[name]
        record["spent_s"] = round(record.get("spent_s", 0.0) + seconds, 3)
        self._save()

    def completed(self, name: str, outputs: str, seconds: float) -> None:
        record = self.stages[name]
        record.update(status="complete", outputs=outputs, finished_at=now(), seconds=round(seconds, 3))
        self._save()

    def _save(self) -> None:
        atomic_write_json(self.path, {"version": VERSION, "stages": self.stages})
