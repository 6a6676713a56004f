"""Benchmarks during training: `train.eval_tasks` run at every evaluation, logged beside val_loss.

    train.eval_tasks = ["arc_easy", "hellaswag"]   # or groups: "core"
    train.eval_limit = 100                          # the first 100 items of each, every time

At each evaluation the loop adds, for each task, its metrics as `eval/<task>/<metric>` (e.g.
`eval/arc_easy/acc`, `eval/arc_easy/acc_norm`, `eval/humaneval/pass@1`) to the metrics line
that holds val_loss, and `eval/core` when core tasks ran. Cheap and deterministic: the same
first items, zero-shot, greedy generation; only the main process evaluates (the others wait at
their next collective), on the bare model under the run's autocast. Prompts follow the rule of
`lmforge eval --format auto`: chat prompts for a fine-tuning run (its run directory records the
base it started from, `base.json`) whose tokenizer has the chat tokens, plain text otherwise.
`lmforge report` draws these rows as accuracy curves across the run's steps.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lmforge.errors import UserError

PARALLEL_OK = ("none", "ddp")  # a replicated model evaluates on one rank; a sharded one cannot
BATCH_SIZE = 16


class TrainingEval:
    """The tasks and tokenizer of train.eval_tasks, checked before training starts."""

    def __init__(self, tasks: list[str], limit: int, tokenizer_dir: Path | None, parallel: str = "none",
                 run_dir: Path | None = None) -> None:
        from lmforge.eval.tasks import BPB, resolve_tasks
        from lmforge.tokenizer import load_tokenizer

        self.tasks = resolve_tasks(",".join(tasks))
        if BPB in self.tasks:
            raise UserError("train.eval_tasks: bpb is already train's val_bpb; drop it")
        if parallel not in PARALLEL_OK:
            raise UserError(f"train.eval_tasks runs with train.parallel {' or '.join(PARALLEL_OK)}, "
                            f"not {parallel!r} (the model is split across ranks)")
        if tokenizer_dir is None:
            raise UserError("train.eval_tasks needs the run's tokenizer; this stage has none")
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.limit = limit
        self.run_dir = run_dir

    def prompt_format(self) -> str:
        """"chat" for a fine-tuning run with the chat tokens, else "base" (asked at each
        evaluation: a stage records its base in the run directory once the loop is built)."""
        from lmforge.chat import CHAT_TOKENS
        from lmforge.finetune.sft import BASE_RECORD

        chat_tokens = all(t in self.tokenizer.special_tokens for t in CHAT_TOKENS)
        fine_tuning = self.run_dir is not None and (self.run_dir / BASE_RECORD).is_file()
        return "chat" if chat_tokens and fine_tuning else "base"

    def __call__(self, model) -> dict[str, float]:
        """{"eval/<task>/<metric>": value} for the model (a DDP wrapper is unwrapped)."""
        from lmforge.eval.runner import EvalOptions, evaluate

        bare = getattr(model, "module", model)
        was_training = bare.training
        bare.eval()
        try:
            results = evaluate(bare, self.tokenizer, self.tasks,
                               EvalOptions(limit=self.limit, batch_size=BATCH_SIZE, progress=False,
                                           format=self.prompt_format()))
        finally:
            bare.train(was_training)
        return flatten(results)


def flatten(results: dict[str, Any]) -> dict[str, float]:
    """The scores of `evaluate`'s results as eval/<task>/<metric> numbers (no stderr, counts)."""
    out: dict[str, float] = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            scored = key in ("acc", "acc_norm", "perplexity") or key.startswith("pass@")
            if scored and isinstance(value, (int, float)) and math.isfinite(value):
                out[f"eval/{task}/{key}"] = float(value)
    if results.get("core"):
        out["eval/core"] = float(results["core"]["centered"])
    return out


def training_eval(train, tokenizer_dir: Path | None, run_dir: Path | None = None) -> TrainingEval | None:
    """The evaluator of a run's `train` section, or None when train.eval_tasks is empty."""
    if not train.eval_tasks:
        return None
    return TrainingEval(list(train.eval_tasks), train.eval_limit, tokenizer_dir, train.parallel, run_dir)
