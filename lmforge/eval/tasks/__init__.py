"""Evaluation tasks by name: the log-likelihood benchmarks here, the generation tasks by name.

    from lmforge.eval.tasks import BENCHMARKS, resolve_tasks
    resolve_tasks("core")          -> ["mmlu", "arc_easy", ...]
    BENCHMARKS["arc_easy"].load(cache) -> (items, few-shot pools)

`GENERATION` names the tasks scored by generation (GSM8K, HumanEval, MBPP, builtin:chat): their
runners are in lmforge/eval/generation.py, reached through `lmforge.eval.runner.RUNNERS` (the
extension point). `bpb` (bits per byte) is a task of its own kind, also run there.
"""

from __future__ import annotations

import functools

from lmforge.errors import UserError
from lmforge.eval.tasks import arc, boolq, hellaswag, lambada, mmlu, piqa, winogrande
from lmforge.eval.tasks.base import Benchmark, Item, with_shots

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    Benchmark("mmlu", lambda c: mmlu.load(None, c), chance=0.25, acc_norm=False, first_n_shots=True),
    Benchmark("arc_easy", lambda c: arc.load("ARC-Easy", c), chance=0.25, shots_from_eval=True),
    Benchmark("arc_challenge", lambda c: arc.load("ARC-Challenge", c), chance=0.25,
              shots_from_eval=True),
    Benchmark("hellaswag", hellaswag.load, chance=0.25, shots_from_eval=True),
    Benchmark("piqa", piqa.load, chance=0.5, shots_from_eval=True),
    Benchmark("winogrande", winogrande.load, chance=0.5, acc_norm=False, shots_from_eval=True),
    Benchmark("boolq", boolq.load, chance=0.5, acc_norm=False, shots_from_eval=True),
    Benchmark("lambada", lambada.load, chance=0.0, acc_norm=False, multiple_choice=False),
)}
GROUPS: dict[str, tuple[str, ...]] = {
    # The multiple-choice set, aggregated CORE-style (each task centred by its chance level).
    "core": ("mmlu", "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq"),
}
BPB = "bpb"
GENERATION = ("gsm8k", "humaneval", "mbpp", "chat")  # see the module docstring
GROUPS["all"] = (BPB, *BENCHMARKS, *GENERATION)


def mmlu_subject(name: str) -> Benchmark | None:
    """`mmlu_<subject>`: one MMLU subject as a task of its own (as lm-evaluation-harness names it)."""
    subject = name.removeprefix("mmlu_")
    if not name.startswith("mmlu_") or subject not in mmlu.subjects():
        return None
    return Benchmark(name, functools.partial(mmlu.load, subject), chance=0.25, acc_norm=False,
                     first_n_shots=True)


def known_tasks() -> list[str]:
    return [*GROUPS["all"], "mmlu_<subject>"]


def resolve_tasks(spec: str) -> list[str]:
    """Comma-separated task and group names -> task names, in order, without repeats."""
    names: list[str] = []
    for word in (w.strip() for w in spec.split(",")):
        if not word:
            continue
        for name in GROUPS.get(word, (word,)):
            if name not in GROUPS["all"] and not name.startswith("mmlu_"):
                raise UserError(f"unknown task {name!r}; known: {', '.join(known_tasks())}, "
                                f"groups: {', '.join(GROUPS)}")
            if name not in names:
                names.append(name)
    if not names:
        raise UserError("--tasks is empty; name tasks or a group (core, all)")
    return names


def benchmark(name: str) -> Benchmark:
    """The log-likelihood benchmark called `name` (mmlu_<subject> included)."""
    found = BENCHMARKS.get(name) or mmlu_subject(name)
    if found is None:
        raise UserError(f"unknown task {name!r}; known: {', '.join(known_tasks())}")
    return found


__all__ = ["BENCHMARKS", "BPB", "GENERATION", "GROUPS", "Benchmark", "Item", "benchmark",
           "known_tasks", "resolve_tasks", "with_shots"]
