"""Held-out pass@1 during alignment: greedy answers to fixed test-split questions, each checked by
its task. DPO and GRPO log it as `pass_at_1` at every evaluation and, with `dpo.select_best` /
`grpo.select_best`, keep the checkpoint where it was highest as the run's result (the training
loop's `Objective.select_by`): the margins and rewards they train on keep rising after the
model's answers stopped getting better (benchmarks/RESULTS.md), so the last step is not the best.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lmforge.tasks.common import Example, Task

EVAL_SEED = 0  # the same questions in every run and at every evaluation


def held_out_questions(tasks: dict[str, Task], n: int, shares: dict[str, float] | None = None) -> list[Example]:
    """About `n` test-split questions: in `shares` (task -> share, summing to 1), else n // len(tasks)
    of each task."""
    counts = ({name: round(share * n) for name, share in shares.items()} if shares
              else dict.fromkeys(tasks, n // len(tasks)))
    return [e for name, count in counts.items() for e in tasks[name].generate("test", EVAL_SEED, max(1, count))]


def live_engine(model: nn.Module, tokenizer: Any, max_batch: int, compile: bool = False,
                autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> Any:
    """An Engine over a model that is training: built once by the objective and used through
    `generating`; the model keeps its mode (the Engine would leave it in eval mode). `compile`:
    its decode step compiled for every batch size up to `max_batch` (the graphs read the live
    weights, so they stay right as training updates them in place), one token a call: runs of
    greedy steps (`Engine.greedy_run`) would add a graph of several steps per batch size, ~30 s
    each to compile cold on a 2-core machine, for the held-out pass@1 alone. `autocast`: the context the
    engine will generate in; its KV cache is made in that dtype (bf16 on a GPU: an fp32 cache
    would hold the bf16 keys at twice the memory - 4.5 GiB for 64 rows of a 124M model)."""
    from lmforge.engine import Engine

    was_training = model.training
    with autocast():
        engine = Engine(model, tokenizer, max_batch=max_batch, compile=compile, compile_max_batch=max_batch,
                        greedy_run=1)
    model.train(was_training)
    return engine


@contextlib.contextmanager
def generating(engine: Any, model: nn.Module, autocast: Callable[[], contextlib.AbstractContextManager]) -> Iterator[Any]:
    """`engine` (built over the live `model`) ready to answer: eval mode, autocast, eager code
    (but for the engine's own compiled step); the model back in its mode after."""
    from lmforge.train.loop import run_compiled_code_eagerly

    was_training = model.training
    with autocast(), run_compiled_code_eagerly():
        model.eval()
        engine.in_eager_region = True  # its own compiled step (with compile) stays compiled
        try:
            yield engine
        finally:
            engine.in_eager_region = False
            model.train(was_training)


@torch.no_grad()
def pass_at_1(engine: Any, examples: Sequence[Example], tasks: dict[str, Task],
              prompt_ids: Callable[[Example], list[int]], max_tokens: int, par: Any) -> float:
    """Share of `examples` whose greedy answer their task accepts; each rank answers its share."""
    from lmforge.engine import SamplingParams

    mine = list(examples[par.dp_rank::par.dp_size])
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    completions = engine.generate([prompt_ids(e) for e in mine], params) if mine else []
    correct = sum(tasks[e.task].check(e, c[0].text) for e, c in zip(mine, completions, strict=True))
    totals = par.all_reduce(torch.tensor([float(correct), float(len(mine))], dtype=torch.float64), "sum")
    return float(totals[0] / totals[1].clamp(min=1))


__all__ = ["EVAL_SEED", "generating", "held_out_questions", "live_engine", "pass_at_1"]
