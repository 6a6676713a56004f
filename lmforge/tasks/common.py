"""The shape every task shares: examples with a reference conversation, a split, a checker.

A task generates `Example`s deterministically from a seed: the conversation (the last assistant
turn is the reference answer), the short `answer` a checker compares against, and the `key` that
identifies the question. Which split a question belongs to depends only on its key (a hash), never
on the seed, so the train and test splits never share a question however many are drawn.
SFT trains on the conversations; evaluation, DPO pair building and RL rewards call `check` on
what a model answered.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmforge.errors import UserError

SPLITS = ("train", "test")
TEST_SHARE = 0.2  # share of each task's questions held out for the test split


@dataclass(frozen=True)
class Example:
    """One question of a task and its reference conversation."""

    task: str
    messages: tuple[dict[str, str], ...]  # ends with the reference assistant answer
    answer: str  # what `check` looks for, e.g. "42" or "Horatio, Hamlet"
    key: str  # the question's identity; decides its split

    @property
    def prompt(self) -> list[dict[str, str]]:
        """The conversation up to the reference answer: what a model is asked."""
        return list(self.messages[:-1])

    @property
    def reference(self) -> str:
        return self.messages[-1]["content"]


def split_of(task: str, key: str) -> str:
    """"test" for TEST_SHARE of all question keys (by hash), "train" for the rest."""
    digest = hashlib.blake2b(f"{task}\0{key}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "big") < TEST_SHARE * 2**64 else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; the splits are {', '.join(SPLITS)}")


def task_rng(task: str, split: str, seed: int) -> random.Random:
    """A generator of its own for each (task, split, seed): adding a task changes no other."""
    return random.Random(f"{task}/{split}/{seed}")


class Task:
    """A family of verifiable questions. Subclasses set `name` and implement `draw` (an
    unbounded question space) or `pool` (a finite one), and `check`."""

    name = "task"
    verifiable = True  # False: `check` only asks for a non-empty reply (chit-chat)
    split_family: str | None = None  # split keys like this task's (None: its own name)

    def generate(self, split: str, seed: int, n: int) -> list[Example]:
        """`n` examples of `split`, the same for the same seed."""
        check_split(split)
        rng = task_rng(self.name, split, seed)
        family = self.split_family or self.name
        pool = self.pool()
        if pool is None:
            return _draw_in_split(family, split, n, lambda: self.draw(rng))
        return _sample_pool([e for e in pool if split_of(family, e.key) == split], n, rng)

    def pool(self) -> Sequence[Example] | None:
        """Every question of a finite task (None: the task draws from an unbounded space)."""
        return None

    def draw(self, rng: random.Random) -> Example:
        raise NotImplementedError

    def check(self, example: Example, answer_text: str) -> bool:
        raise NotImplementedError

    def check_work(self, example: Example, answer_text: str) -> bool:
        """`check`, and the working that leads to the answer is right too, where the task can tell
        (an answer may be right by luck); by default the same as `check`."""
        return self.check(example, answer_text)

    def reward(self, example: Example, answer_text: str) -> float:
        """1.0 for a correct answer, 0.0 otherwise (what RL maximises)."""
        return float(self.check(example, answer_text))


def _draw_in_split(task: str, split: str, n: int, draw: Callable[[], Example]) -> list[Example]:
    out = []
    for _ in range(100 * n + 100):  # a split holds >= 20% of keys: this is never reached
        if len(out) == n:
            break
        example = draw()
        if split_of(task, example.key) == split:
            out.append(example)
    return out


def _sample_pool(pool: list[Example], n: int, rng: random.Random) -> list[Example]:
    """`n` examples of a finite pool: a sample, or the whole pool repeated in shuffled rounds."""
    if not pool:
        return []
    if n <= len(pool):
        return rng.sample(pool, n)
    out: list[Example] = []
    while len(out) < n:
        out += rng.sample(pool, min(len(pool), n - len(out)))
    return out


def conversation(question: str, answer: str) -> tuple[dict[str, str], ...]:
    return ({"role": "user", "content": question}, {"role": "assistant", "content": answer})


def normalize(text: str) -> str:
    """Lower case, single spaces, no surrounding punctuation: for lenient comparisons."""
    return re.sub(r"\s+", " ", text.lower()).strip(" .!?,;:'\"`")


def final_number(text: str) -> str | None:
    """The number after the last `####`, else the last number in `text` (commas ignored)."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = re.findall(r"-?\d+", tail.replace(",", ""))
    return numbers[-1] if numbers else None
