"""PIQA: physical commonsense, which of two solutions reaches a goal.

lm-evaluation-harness `piqa`: "Question: {goal}\\nAnswer:" and the two solutions; acc, acc_norm.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.eval.data import read_arrow
from lmforge.eval.tasks.base import Item


def item(doc: dict) -> Item:
    return Item(f"Question: {doc['goal']}\nAnswer:", (doc["sol1"], doc["sol2"]), int(doc["label"]))


def load(cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items = [item(d) for d in read_arrow("hf_datasets/piqa/plain_text/validation", cache)]
    return items, {"": items}
