"""Held-out accuracy on the verifiable built-in tasks of chat checkpoints (e.g. the SFT model and
its DPO or GRPO run), each greedy answer checked by its task's `check`
(lmforge.tasks.score.score_task); the same along a run's checkpoints; and the training curve of an
alignment run from its metrics.jsonl.

    python benchmarks/bench_dpo_quality.py --model sft=/work/bases/sft --model dpo=/tmp/dpo --curve /tmp/dpo
    python benchmarks/bench_dpo_quality.py --model sft=/work/bases/life/sft --checkpoints /tmp/dpo

A task with a finite test pool (letters, identity) is scored on its distinct questions, at most
`--n` (the eval's `--limit` would repeat them). Against the first `--model`, every later model and
checkpoint gets a paired comparison on the same questions: how many went wrong -> right and right
-> wrong, and the change in the number right with its standard error, sqrt(b + c) for b and c
flips (McNemar): a rise counts when it exceeds about two of them.

Not a test: numbers for benchmarks/RESULTS.md ("DPO and reward models on the tiny model" and
"Alignment that raises held-out accuracy").
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

TASKS = ("arithmetic", "letters", "identity", "shakespeare", "bible", "docstrings")


def held_out(path: str | Path, n: dict[str, int], max_new_tokens: int) -> dict[str, dict[str, bool]]:
    """Per task, {question key: answered right} for the checkpoint at `path` (n[task] questions)."""
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.tasks import make_tasks
    from lmforge.tasks.common import split_of
    from lmforge.tasks.score import score_task
    from lmforge.tokenizer import load_tokenizer

    tasks = make_tasks()
    model = load_model(path)
    tokenizer = load_tokenizer(resolve_checkpoint(path) / "tokenizer")
    out = {}
    for name in TASKS:
        task = tasks[name]
        pool = task.pool()
        size = n[name] if pool is None else min(n[name], sum(split_of(task.split_family or name, e.key) == "test" for e in pool))
        score = score_task(model, tokenizer, task, n=size, max_new_tokens=max_new_tokens)
        out[name] = {e.key: task.check(e, a) for e, a in score.answers}
    return out


def selection_keys(kind: str) -> set[tuple[str, str]]:
    """(task, key) of the held-out questions a default `lmforge dpo` / `grpo --tasks chat` run
    selects its checkpoint on (lmforge/align/heldout.py): scored apart, they give a number the
    selection did not see."""
    from lmforge.align.dpo import held_out_tasks
    from lmforge.align.grpo import resolve_tasks
    from lmforge.align.heldout import held_out_questions
    from lmforge.config import RunConfig

    if kind == "dpo":
        held = held_out_tasks(RunConfig(), tokenizer=None)
        questions = held.questions if held is not None else []
    else:
        questions = held_out_questions(resolve_tasks(["chat"]), RunConfig().grpo.eval_examples)
    return {(e.task, e.key) for e in questions}


def without(result: dict[str, dict[str, bool]], keys: set[tuple[str, str]]) -> dict[str, dict[str, bool]]:
    return {t: {k: v for k, v in r.items() if (t, k) not in keys} for t, r in result.items()}


def row(name: str, result: dict[str, dict[str, bool]], before: dict[str, dict[str, bool]] | None) -> str:
    """A table row: right/total per task, their total, and the paired change against `before`."""
    cells = [f"{sum(r.values())}/{len(r)}" for r in result.values()]
    right, total = sum(sum(r.values()) for r in result.values()), sum(len(r) for r in result.values())
    change = ""
    if before is not None:
        gained = sum(v and not before[t][k] for t, r in result.items() for k, v in r.items())
        lost = sum(before[t][k] and not v for t, r in result.items() for k, v in r.items())
        change = f" | +{gained} -{lost}: {gained - lost:+d} +- {math.sqrt(gained + lost):.1f}"
    return f"| {name} | {' | '.join(cells)} | {right}/{total} ({right / total:.1%}){change} |"


def accuracy_table(models: list[str], runs: list[str], n: dict[str, int], max_new_tokens: int,
                   exclude: set[tuple[str, str]] = frozenset()) -> None:
    from lmforge.train.checkpoint import CheckpointManager

    def score(path: str | Path) -> dict[str, dict[str, bool]]:
        # the questions a run chose its checkpoint on (`exclude`) are left out of every row
        return without(held_out(path, n, max_new_tokens), exclude)

    print(f"| model | {' | '.join(TASKS)} | total | vs first: gained, lost, change +- se |\n"
          f"|---|{'---|' * (len(TASKS) + 2)}")
    first = None
    for spec in models:
        name, path = spec.split("=", 1)
        start = time.perf_counter()
        result = score(path)
        print(row(name, result, first) + f"  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)
        first = first or result
    for run in runs:
        for step, checkpoint in CheckpointManager(Path(run), 1).complete():
            print(row(f"{Path(run).name} step {step}", score(checkpoint), first),
                  flush=True)


def curve(run_dir: Path) -> None:
    """Training rows (every log) and evaluation rows of an alignment run, side by side by step
    (DPO: margins, reward accuracy, val_loss; GRPO: reward_mean; both: held-out pass_at_1)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r and "event" not in r}
    evals = {r["step"]: r for r in rows if "val_loss" in r or "pass_at_1" in r}
    keys = [k for k in ("reward_margin", "reward_accuracy", "accuracy", "reward_mean", "kl")
            if any(k in r for r in train.values())]
    held = [k for k in ("val_loss", "reward_accuracy", "reward_margin", "accuracy", "pass_at_1")
            if any(k in r for r in evals.values())]
    print(f"\n| step | loss | {' | '.join(keys)} | {' | '.join('held-out ' + k for k in held)} |")
    print(f"|---:|---:|{'---:|' * (len(keys) + len(held))}")
    for step in sorted(evals):
        r, e = train.get(step, {}), evals[step]
        cells = [f"{r.get('loss', float('nan')):.4f}", *(f"{r.get(k, float('nan')):.3f}" for k in keys),
                 *(f"{e.get(k, float('nan')):.3f}" for k in held)]
        print(f"| {step} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                        help="a chat checkpoint or run directory to score (repeatable; the first is "
                             "the baseline of the paired comparison)")
    parser.add_argument("--checkpoints", action="append", default=[], metavar="RUN_DIR",
                        help="score every complete checkpoint of this run (repeatable)")
    parser.add_argument("--curve", action="append", default=[], metavar="RUN_DIR",
                        help="print this run's curve (repeatable)")
    parser.add_argument("--n", type=int, default=200, help="test questions per task (at most)")
    parser.add_argument("--n-task", action="append", default=[], metavar="TASK=N",
                        help="another number of questions for one task (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--exclude-selection", choices=("dpo", "grpo"),
                        help="leave out the held-out questions a default dpo / grpo run selects its "
                             "checkpoint on (an unbiased score of the selected checkpoint)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n = {task: args.n for task in TASKS} | {k: int(v) for k, v in (s.split("=") for s in args.n_task)}
    if args.model or args.checkpoints:
        exclude = selection_keys(args.exclude_selection) if args.exclude_selection else set()
        accuracy_table(args.model, args.checkpoints, n, args.max_new_tokens, exclude)
    for run in args.curve:
        curve(Path(run))


if __name__ == "__main__":
    main()
