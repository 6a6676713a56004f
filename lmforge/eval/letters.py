"""Multiple choice for chat models: the question with lettered choices, answered with a letter.

`lmforge eval --format letters` asks each multiple-choice item as one user turn of the chat format:

    <|user|>{description}{question}
    A. {choice 0}
    B. {choice 1}
    ...
    Answer with the letter of the correct choice.<|end|><|assistant|>

and scores the item by the log-likelihood of each letter as the assistant's first token(s): the
prediction is the most likely letter (the way MMLU is scored for instruction-tuned models and
nanochat's ChatCORE scores its categorical tasks: only the letters compete, so a model that would
rather say something else is still read). Only `acc` is defined (letters have no length to
normalise by). Few-shot examples are earlier user/assistant turns, answered with their letter.

The question is the item's own prompt, less its trailing "Answer:" (MMLU's prompt already lists
its choices, and its choices are the letters); a text to continue (HellaSwag) is introduced as
such, and WinoGrande's two fillings are shown as whole sentences.
"""

from __future__ import annotations

import string
from typing import Any

from lmforge.eval.tasks.base import TARGET_DELIMITER, Item

INSTRUCTION = "Answer with the letter of the correct choice."


def letters(item: Item) -> tuple[str, ...]:
    return tuple(string.ascii_uppercase[:len(item.choices)])


def question(item: Item) -> str:
    """The user turn's text: the question and its lettered choices, then the instruction."""
    marks = letters(item)
    if item.target is not None:  # WinoGrande: each choice is a filled-in start of the sentence
        stem, options = "Which sentence is right?", [c + TARGET_DELIMITER + item.target for c in item.choices]
    else:
        stem, options = item.context.strip(), list(item.choices)
        if stem.endswith("Answer:"):
            stem = stem.removesuffix("Answer:").rstrip()
        else:
            stem = f"Which choice continues this text best?\n{stem}"
    listed = "" if item.choices == marks else "".join(f"\n{m}. {o}" for m, o in zip(marks, options))
    return f"{item.description}{stem}{listed}\n{INSTRUCTION}"


def messages(item: Item, shots: list[Item]) -> list[dict[str, str]]:
    turns: list[dict[str, str]] = []
    for s in shots:
        turns += [{"role": "user", "content": question(s)},
                  {"role": "assistant", "content": letters(s)[s.gold]}]
    return turns + [{"role": "user", "content": question(item)}]


def requests(tokenizer, item: Item, shots: list[Item]) -> list[tuple[list[int], list[int]]]:
    """(chat prompt ids, letter ids) for each choice."""
    from lmforge.chat import render_prompt

    prompt = render_prompt(tokenizer, messages(item, shots))
    return [(prompt, tokenizer.encode(mark)) for mark in letters(item)]


def record(item: Item, loglikelihoods: list[float]) -> dict[str, Any]:
    pred = max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)
    return {"loglikelihoods": loglikelihoods, "gold": item.gold, "pred": pred,
            "acc": float(pred == item.gold)}
