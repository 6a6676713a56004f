"""Arithmetic with worked steps: sums, differences, products and short word problems.

Every answer shows its steps and ends with `#### N` (the GSM8K convention), which `check` reads.
"""

from __future__ import annotations

import random

from lmforge.tasks.common import Example, Task, conversation, final_number

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "stones"]


def _tens_split(b: int) -> list[int]:
    """b as its place-value parts, largest first: 385 -> [300, 80, 5]."""
    digits = str(b)
    parts = [int(d) * 10 ** (len(digits) - i - 1) for i, d in enumerate(digits)]
    return [p for p in parts if p] or [0]


def sum_steps(a: int, b: int) -> str:
    """a + b by adding b's place-value parts one at a time."""
    steps, total = [], a
    for part in _tens_split(b):
        steps.append(f"{total} + {part} = {total + part}")
        total += part
    return "; ".join(steps)


def difference_steps(a: int, b: int) -> str:
    steps, total = [], a
    for part in _tens_split(b):
        steps.append(f"{total} - {part} = {total - part}")
        total -= part
    return "; ".join(steps)


def product_steps(a: int, b: int) -> str:
    parts = _tens_split(b)
    partials = [a * p for p in parts]
    lines = [f"{a} * {p} = {a * p}" for p in parts]
    if len(parts) > 1:
        lines.append(" + ".join(map(str, partials)) + f" = {sum(partials)}")
    return "; ".join(lines)


class Arithmetic(Task):
    name = "arithmetic"

    def draw(self, rng: random.Random) -> Example:
        kind = rng.choice(["sum", "difference", "product", "word"])
        if kind == "word":
            return self._word_problem(rng)
        if kind == "product":
            a, b = rng.randint(2, 999), rng.randint(2, 99)
        else:
            a, b = rng.randint(1, 9999), rng.randint(1, 999)
        if kind == "difference" and b > a:
            a, b = b, a
        op, result, steps = {
            "sum": ("+", a + b, sum_steps(a, b)),
            "difference": ("-", a - b, difference_steps(a, b)),
            "product": ("*", a * b, product_steps(a, b)),
        }[kind]
        question = rng.choice(["What is {a} {op} {b}?", "Compute {a} {op} {b}.", "{a} {op} {b} = ?"])
        answer = f"{steps}.\nSo {a} {op} {b} = {result}.\n#### {result}"
        return Example(self.name, conversation(question.format(a=a, op=op, b=b), answer),
                       str(result), f"{op}:{a}:{b}")

    def _word_problem(self, rng: random.Random) -> Example:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        template = rng.randrange(3)
        if template == 0:
            a, b = rng.randint(2, 200), rng.randint(2, 200)
            question = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
            steps, result = f"{name} starts with {a} and gains {b}: {sum_steps(a, b)}.", a + b
        elif template == 1:
            a = rng.randint(10, 300)
            b = rng.randint(1, a - 1)
            question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
            steps, result = f"{name} starts with {a} and loses {b}: {difference_steps(a, b)}.", a - b
        else:
            a, b = rng.randint(2, 12), rng.randint(2, 30)
            question = f"{name} has {a} bags with {b} {item} in each. How many {item} is that in all?"
            steps, result = f"{a} bags of {b} each: {product_steps(b, a)}.", a * b
        answer = f"{steps}\n#### {result}"
        # The names and items do not make a new question: the numbers and the story do.
        return Example(self.name, conversation(question, answer), str(result), f"word{template}:{a}:{b}")

    def check(self, example: Example, answer_text: str) -> bool:
        return final_number(answer_text) == example.answer
