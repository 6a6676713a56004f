"""ARC (AI2 Reasoning Challenge): grade-school science questions, Easy and Challenge sets.

lm-evaluation-harness `arc_easy`/`arc_challenge`: "Question: {question}\\nAnswer:" scored against
each answer text; acc and acc_norm. The wheel ships the validation split only: it is evaluated, and
shots are drawn from it too (never the item itself).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.eval.data import read_arrow
from lmforge.eval.tasks.base import Item


def item(doc: dict) -> Item:
    labels = list(doc["choices"]["label"])
    return Item(f"Question: {doc['question']}\nAnswer:", tuple(doc["choices"]["text"]),
                labels.index(doc["answerKey"]))


def load(subset: str, cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items = [item(d) for d in read_arrow(f"hf_datasets/ai2_arc/{subset}/validation", cache)]
    return items, {"": items}
