"""HellaSwag: pick the most plausible continuation of an everyday scene (ActivityNet, WikiHow).

lm-evaluation-harness `hellaswag`: query "{activity_label}: {ctx_a} {Ctx_b}" and the four endings,
cleaned of WikiHow's bracket artefacts; acc and acc_norm (the one usually quoted). Validation split.
"""

from __future__ import annotations

import re
from pathlib import Path

from lmforge.eval.data import read_arrow
from lmforge.eval.tasks.base import Item


def preprocess(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def item(doc: dict) -> Item:
    context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(preprocess(doc["activity_label"] + ": " + context),
                tuple(preprocess(e) for e in doc["endings"]), int(doc["label"]))


def load(cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items = [item(d) for d in read_arrow("hf_datasets/hellaswag/none/validation", cache)]
    return items, {"": items}
