"""Score a model on a task's held-out questions: greedy answers checked with the task's `check`.

    from lmforge.tasks import make_tasks
    from lmforge.tasks.score import score_task
    score = score_task(model, tokenizer, make_tasks()["arithmetic"], n=100)           # chat prompt
    score = score_task(base, tokenizer, task, n=100, few_shot=3)                      # base model
    score.accuracy                                                                    # share right

A chat model is asked with the chat format (`render_prompt`) and answers until `<|end|>`. A base
model, which never saw the chat tokens, is prompted few-shot in plain text instead: `few_shot`
solved questions of the task's train split as "Question: ...\nAnswer: ...\n\n", then the question;
its answer is cut at the first blank line or a new "Question:". (The evaluation stage will call
this from `lmforge eval --tasks chat`.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmforge.tasks.common import Example, Task

_QUESTION, _ANSWER = "Question: ", "Answer: "


@dataclass
class TaskScore:
    """How a model did on one task's test questions."""

    task: str
    correct: int
    total: int
    answers: list[tuple[Example, str]] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def few_shot_prompt(shots: list[Example], example: Example) -> str:
    """Plain-text prompt for a base model: solved questions, then the one asked."""
    def turn(e: Example) -> str:
        return f"{_QUESTION}{e.prompt[-1]['content']}\n{_ANSWER}"

    return "".join(f"{turn(s)}{s.reference}\n\n" for s in shots) + turn(example)


@torch.no_grad()
def answer(model: nn.Module, prompt_ids: list[int], stop_ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt_ids` (cut to the model's context), without the stop token."""
    from lmforge.engine import generate

    context = model.cfg.max_seq_len
    prompt_ids = prompt_ids[-(context - max_new_tokens):]
    device = next(model.parameters()).device
    out = generate(model, torch.tensor([prompt_ids], device=device), max_new_tokens,
                   temperature=0.0, stop_tokens=stop_ids)[0, len(prompt_ids):].tolist()
    return [t for t in out if t not in stop_ids]


def score_task(model: nn.Module, tokenizer, task: Task, n: int = 100, seed: int = 0,
               few_shot: int = 0, max_new_tokens: int = 64) -> TaskScore:
    """Accuracy of `model` on `n` questions of `task`'s test split (the same for the same seed).
    few_shot = 0: chat prompts; > 0: a plain-text prompt with that many solved train questions."""
    from lmforge.chat import render_prompt

    was_training = model.training
    model.eval()
    examples = task.generate("test", seed, n)
    shots = task.generate("train", seed, few_shot) if few_shot else []
    end = tokenizer.special_tokens["<|end|>"] if "<|end|>" in tokenizer.special_tokens else tokenizer.eot_id
    score = TaskScore(task.name, 0, len(examples))
    for example in examples:
        if few_shot:
            ids = answer(model, tokenizer.encode(few_shot_prompt(shots, example)), [tokenizer.eot_id],
                         max_new_tokens)
            text = tokenizer.decode(ids).split("\n\n")[0].split(_QUESTION)[0].strip()
        else:
            ids = answer(model, render_prompt(tokenizer, example.prompt), [end, tokenizer.eot_id],
                         max_new_tokens)
            text = tokenizer.decode(ids).strip()
        score.correct += int(task.check(example, text))
        score.answers.append((example, text))
    model.train(was_training)
    return score


__all__ = ["TaskScore", "answer", "few_shot_prompt", "score_task"]
