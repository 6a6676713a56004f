"""Held-out accuracy on the verifiable built-in tasks of chat checkpoints (e.g. the SFT model and
its DPO run), each greedy answer checked by its task's `check` (lmforge.tasks.score.score_task),
and the training curve of an alignment run from its metrics.jsonl.

    python benchmarks/bench_dpo_quality.py --model sft=/work/bases/sft --model dpo=/tmp/dpo --curve /tmp/dpo

Not a test: numbers for benchmarks/RESULTS.md ("DPO and reward models on the tiny model").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

TASKS = ("arithmetic", "letters", "identity", "shakespeare", "bible", "docstrings")


def accuracy_table(models: list[str], n: int, max_new_tokens: int) -> None:
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.tasks import make_tasks
    from lmforge.tasks.score import score_task
    from lmforge.tokenizer import load_tokenizer

    tasks = make_tasks()
    print(f"| model | {' | '.join(TASKS)} | mean |\n|---|{'---|' * (len(TASKS) + 1)}")
    for spec in models:
        name, path = spec.split("=", 1)
        start = time.perf_counter()
        model = load_model(path)
        tokenizer = load_tokenizer(resolve_checkpoint(path) / "tokenizer")
        scores = [score_task(model, tokenizer, tasks[t], n=n, max_new_tokens=max_new_tokens) for t in TASKS]
        cells = " | ".join(f"{s.correct}/{s.total}" for s in scores)
        mean = sum(s.accuracy for s in scores) / len(scores)
        total = sum(s.correct for s in scores), sum(s.total for s in scores)
        print(f"| {name} | {cells} | {mean:.1%} ({total[0]}/{total[1]}) |"
              f"  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)


def curve(run_dir: Path) -> None:
    """Training rows (every log) and evaluation rows of an alignment run, side by side by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "loss" in r and "event" not in r}
    evals = {r["step"]: r for r in rows if "val_loss" in r}
    keys = [k for k in ("reward_margin", "reward_accuracy", "accuracy") if any(k in r for r in train.values())]
    held = [k for k in ("reward_accuracy", "reward_margin", "accuracy") if any(k in r for r in evals.values())]
    print(f"\n| step | loss | {' | '.join(keys)} | val_loss | {' | '.join('held-out ' + k for k in held)} |")
    print(f"|---:|---:|{'---:|' * len(keys)}---:|{'---:|' * len(held)}")
    for step in sorted(evals):
        r, e = train.get(step, {}), evals[step]
        cells = [f"{r.get('loss', float('nan')):.4f}", *(f"{r.get(k, float('nan')):.3f}" for k in keys),
                 f"{e['val_loss']:.4f}", *(f"{e[k]:.3f}" for k in held)]
        print(f"| {step} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=[], metavar="NAME=CKPT",
                        help="a chat checkpoint or run directory to score (repeatable)")
    parser.add_argument("--curve", action="append", default=[], metavar="RUN_DIR",
                        help="print this run's curve (repeatable)")
    parser.add_argument("--n", type=int, default=100, help="test questions per task")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model:
        accuracy_table(args.model, args.n, args.max_new_tokens)
    for run in args.curve:
        curve(Path(run))


if __name__ == "__main__":
    main()
