"""WinoGrande: fill the blank of a sentence with one of two people or things.

lm-evaluation-harness `winogrande` scores *partially*: each option fills the blank, giving two
contexts, and the same rest of the sentence is scored after each; only acc is defined.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.eval.data import read_arrow
from lmforge.eval.tasks.base import Item


def item(doc: dict) -> Item:
    sentence = doc["sentence"]
    blank = sentence.index("_")
    return Item("", (sentence[:blank] + doc["option1"], sentence[:blank] + doc["option2"]),
                {"1": 0, "2": 1}[doc["answer"]], target=sentence[blank + 1:].strip())


def load(cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items = [item(d) for d in read_arrow("hf_datasets/winogrande/winogrande_xl/validation", cache)]
    return items, {"": items}
