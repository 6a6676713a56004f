"""Arithmetic with the calculator: sums, differences, products and short word problems.

A tiny model cannot add 4-digit numbers in its head, but it can learn to copy the numbers of a
question into a calculator call. Every reference answer is that call, the result the engine
injects (lmforge/chat/format.py masks it out of the loss), and the GSM8K-style `#### N` that
`check` reads:

    What is 1234 + 567?   ->   <|tool|>1234 + 567<|/tool|>1801
                               #### 1801

Difficulty is mixed: operands of one to four digits, questions in symbols or in words (some with
the operands in reverse order, "Subtract 5 from 12"), and word problems whose operation has to be
read from the story, one of them two steps in one expression.
"""

from __future__ import annotations

import random

from lmforge.calculator import calculate
from lmforge.chat.format import TOOL_TOKENS
from lmforge.tasks.common import Example, Task, conversation, final_number

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "stones"]

# Ways to ask for `a op b`: in symbols, or in words ({a} and {b} where the sentence puts them).
QUESTIONS = {
    "+": ["What is {a} + {b}?", "Compute {a} + {b}.", "{a} + {b} = ?", "What is {a} plus {b}?",
          "Add {a} and {b}."],
    "-": ["What is {a} - {b}?", "Compute {a} - {b}.", "{a} - {b} = ?", "What is {a} minus {b}?",
          "Subtract {b} from {a}."],
    "*": ["What is {a} * {b}?", "Compute {a} * {b}.", "{a} * {b} = ?", "What is {a} times {b}?",
          "Multiply {a} by {b}."],
}


def tool_answer(expression: str) -> tuple[str, str]:
    """(reference answer, result) for one calculator call: the call, its result, `#### result`."""
    result = calculate(expression)
    return f"{TOOL_TOKENS[0]}{expression}{TOOL_TOKENS[1]}{result}\n#### {result}", result


# How often a number has 1, 2, 3, 4 digits (cut to the first max_digits): short numbers are
# common because a small model learns to copy numbers into the call from them first.
DIGIT_WEIGHTS = (0.3, 0.35, 0.2, 0.15)


def _number(rng: random.Random, max_digits: int) -> int:
    """A number of 1..max_digits digits, short ones more often (DIGIT_WEIGHTS)."""
    digits = rng.choices(range(1, max_digits + 1), weights=DIGIT_WEIGHTS[:max_digits])[0]
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


class Arithmetic(Task):
    name = "arithmetic"

    def draw(self, rng: random.Random) -> Example:
        op = rng.choice(["+", "-", "*", "word"])
        if op == "word":
            return self._word_problem(rng)
        a, b = (_number(rng, 3), _number(rng, 2)) if op == "*" else (_number(rng, 4), _number(rng, 4))
        if op == "-" and b > a:
            a, b = b, a
        answer, result = tool_answer(f"{a} {op} {b}")
        question = rng.choice(QUESTIONS[op]).format(a=a, b=b)
        return Example(self.name, conversation(question, answer), result, f"{op}:{a}:{b}")

    def _word_problem(self, rng: random.Random) -> Example:
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        template = rng.randrange(5)
        a, b, c = _number(rng, 3), _number(rng, 3), 0
        if template == 0:
            question = f"{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?"
            expression = f"{a} + {b}"
        elif template == 1:
            a, b = max(a, b) + 1, min(a, b)
            question = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
            expression = f"{a} - {b}"
        elif template == 2:
            a, b = rng.randint(2, 12), _number(rng, 2)
            question = f"{name} has {a} bags with {b} {item} in each. How many {item} is that in all?"
            expression = f"{a} * {b}"
        elif template == 3:  # two steps, one expression
            a, b, c = rng.randint(2, 12), _number(rng, 2), _number(rng, 2)
            question = (f"{name} has {a} boxes of {b} {item} and {c} loose {item}. "
                        f"How many {item} does {name} have?")
            expression = f"{a} * {b} + {c}"
        else:  # sharing: a division that comes out even
            a, b = rng.randint(2, 12), _number(rng, 2)
            question = f"{name} shares {a * b} {item} equally among {a} friends. How many does each get?"
            expression = f"{a * b} / {a}"
        answer, result = tool_answer(expression)
        # The names and items do not make a new question: the numbers and the story do.
        return Example(self.name, conversation(question, answer), result, f"word{template}:{a}:{b}:{c}")

    def check(self, example: Example, answer_text: str) -> bool:
        return final_number(answer_text) == example.answer


class ShortArithmetic(Arithmetic):
    """`builtin:arithmetic`, the first stage of a curriculum: `a op b` in symbols with operands
    0-99, where a small model first learns to copy numbers into the call (measured: the full
    mixture alone did not get there in 1,400 steps, this did in ~1,000 and carried it over).
    Its keys and splits are the arithmetic task's, so it never trains on a held-out question."""

    name = "arithmetic_short"
    split_family = "arithmetic"

    def draw(self, rng: random.Random) -> Example:
        op = rng.choice(["+", "-", "*"])
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        answer, result = tool_answer(f"{a} {op} {b}")
        question = rng.choice(QUESTIONS[op][:3]).format(a=a, b=b)  # the symbolic ones
        return Example(self.name, conversation(question, answer), result, f"{op}:{a}:{b}")
