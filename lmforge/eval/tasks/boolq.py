"""BoolQ: yes/no questions about a Wikipedia passage.

lm-evaluation-harness `boolq` (SuperGLUE): "{passage}\\nQuestion: {question}?\\nAnswer:" against
" no" / " yes"; acc only.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.eval.data import read_arrow
from lmforge.eval.tasks.base import Item


def item(doc: dict) -> Item:
    return Item(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ("no", "yes"),
                int(bool(doc["answer"])))


def load(cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items = [item(d) for d in read_arrow("hf_datasets/boolq/none/validation", cache)]
    return items, {"": items}
