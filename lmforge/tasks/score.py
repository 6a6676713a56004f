"""Score a model on a task's held-out questions: greedy answers checked with the task's `check`.

    from lmforge.tasks import make_tasks
    from lmforge.tasks.score import score_task
    score = score_task(model, tokenizer, make_tasks()["arithmetic"], n=100)           # chat prompt
    score = score_task(base, tokenizer, task, n=100, few_shot=3)                      # base model
    score.accuracy                                                                    # share right

The answers come from `lmforge.engine.Engine`, all questions in one continuous batch, greedy, with
the calculator on (a model that writes `<|tool|>expr<|/tool|>` gets the result injected, as in
`lmforge chat`). A chat model is asked with the chat format (`render_prompt`) and answers until
`<|end|>`. A base model, which never saw the chat tokens, is prompted few-shot in plain text
instead: `few_shot` solved questions of the task's train split as "Question: ...\nAnswer: ...\n\n"
(their calculator calls written with the tool tokens, so a base model may copy the pattern), then
the question; its answer ends at the first blank line or a new "Question:".
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from lmforge.tasks.common import Example, Task

_QUESTION, _ANSWER = "Question: ", "Answer: "
MAX_BATCH = 32  # questions answered at once (the engine's KV cache holds this many rows)


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


def _turn(example: Example) -> str:
    return f"{_QUESTION}{example.prompt[-1]['content']}\n{_ANSWER}"


def few_shot_prompt(shots: list[Example], example: Example) -> str:
    """Plain-text prompt for a base model: solved questions, then the one asked."""
    return "".join(f"{_turn(s)}{s.reference}\n\n" for s in shots) + _turn(example)


def few_shot_ids(tokenizer, shots: list[Example], example: Example) -> list[int]:
    """`few_shot_prompt` as token ids, the solved answers encoded as the chat format encodes an
    assistant turn (tool tokens as tokens, so the calculator works for a base model too)."""
    from lmforge.chat import encode_assistant

    ids: list[int] = []
    for shot in shots:
        ids += tokenizer.encode(_turn(shot)) + encode_assistant(tokenizer, shot.reference, strict=False)[0]
        ids += tokenizer.encode("\n\n")
    return ids + tokenizer.encode(_turn(example))


def score_task(model: nn.Module, tokenizer, task: Task, n: int = 100, seed: int = 0,
               few_shot: int = 0, max_new_tokens: int = 64) -> TaskScore:
    """Accuracy of `model` on `n` questions of `task`'s test split (the same for the same seed).
    few_shot = 0: chat prompts; > 0: a plain-text prompt with that many solved train questions."""
    from lmforge.chat import render_prompt
    from lmforge.engine import Engine, SamplingParams

    examples = task.generate("test", seed, n)
    shots = task.generate("train", seed, few_shot) if few_shot else []
    if few_shot:
        prompts = [few_shot_ids(tokenizer, shots, e) for e in examples]
    else:
        prompts = [render_prompt(tokenizer, e.prompt) for e in examples]
    # A prompt too long to leave room for the answer loses its start (the oldest few-shot
    # examples); the answer may take at most half the context away from the prompt.
    keep = model.cfg.max_seq_len - min(max_new_tokens, model.cfg.max_seq_len // 2)
    prompts = [p[-keep:] for p in prompts]
    params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0,
                            stop=("\n\n", _QUESTION) if few_shot else ())
    was_training = model.training
    try:
        engine = Engine(model, tokenizer, max_batch=max(1, min(len(examples), MAX_BATCH)))
        completions = engine.generate(prompts, params) if examples else []
    finally:
        model.train(was_training)
    score = TaskScore(task.name, 0, len(examples))
    for example, (completion,) in zip(examples, completions, strict=True):
        text = completion.text.strip()
        score.correct += int(task.check(example, text))
        score.answers.append((example, text))
    return score


__all__ = ["MAX_BATCH", "TaskScore", "few_shot_ids", "few_shot_prompt", "score_task"]
