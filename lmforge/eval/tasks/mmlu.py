"""MMLU: 57 subjects of multiple-choice exam questions (high school to professional level).

lm-evaluation-harness `mmlu` (default variant): the question and lettered choices, then
"Answer:", scored against " A" ... " D"; the description names the subject; shots are the first k
of the subject's dev split. acc only; `mmlu` pools every subject's test items (the harness'
size-weighted group mean), `mmlu_<subject>` is one subject.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.eval.data import benchmark_files, read_arrow
from lmforge.eval.tasks.base import Item

ROOT = "hf_datasets/hails/mmlu_no_train"


def subjects(cache: Path | None = None) -> list[str]:
    return sorted({n.split("/")[3] for n in benchmark_files(cache) if n.startswith(ROOT + "/")})


def item(doc: dict, subject: str) -> Item:
    c = doc["choices"]
    prompt = (f"{doc['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:")
    description = ("The following are multiple choice questions (with answers) about "
                   f"{subject.replace('_', ' ')}.\n\n")
    return Item(prompt, ("A", "B", "C", "D"), int(doc["answer"]), description=description, pool=subject)


def load(only: str | None, cache: Path | None) -> tuple[list[Item], dict[str, list[Item]]]:
    items: list[Item] = []
    pools: dict[str, list[Item]] = {}
    for subject in [only] if only else subjects(cache):
        items += [item(d, subject) for d in read_arrow(f"{ROOT}/{subject}/test", cache)]
        pools[subject] = [item(d, subject) for d in read_arrow(f"{ROOT}/{subject}/dev", cache)]
    return items, pools
