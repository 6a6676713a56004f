"""Held-out accuracy before and after `lmforge grpo`, and the run's reward curve.

    python benchmarks/bench_grpo_quality.py --before /work/bases/sft --after /tmp/grpo_run --tasks arithmetic letters

Accuracy is `lmforge.tasks.score.score_task`: greedy answers to the first `--n` test-split
questions of each task, chat prompt, checked by the task's `check` (the same questions for both
models). The curve is the run's metrics.jsonl: `reward_mean` averaged over windows of steps, and
the `pass_at_1` rows. Not a test: numbers for benchmarks/RESULTS.md ("GRPO on the tiny model").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def accuracy_table(models: list[tuple[str, str]], tasks: list[str], n: int, max_new_tokens: int) -> None:
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.tasks import make_tasks
    from lmforge.tasks.score import score_task
    from lmforge.tokenizer import load_tokenizer

    known = make_tasks()
    print(f"| model | {' | '.join(tasks)} | mean |\n|---|{'---|' * (len(tasks) + 1)}")
    for name, path in models:
        start = time.perf_counter()
        model = load_model(path)
        tokenizer = load_tokenizer(resolve_checkpoint(path) / "tokenizer")
        scores = [score_task(model, tokenizer, known[t], n=n, max_new_tokens=max_new_tokens) for t in tasks]
        cells = " | ".join(f"{s.accuracy:.0%} ({s.correct}/{s.total})" for s in scores)
        mean = sum(s.accuracy for s in scores) / len(scores)
        print(f"| {name} | {cells} | {mean:.0%} |  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)


def reward_curve(run: Path, window: int) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r and "event" not in r]
    print("\n| steps | reward_mean | zero_signal_groups | kl | entropy | answer_tokens |\n|---|---:|---:|---:|---:|---:|")
    for lo in range(0, len(steps), window):
        chunk = steps[lo:lo + window]

        def mean(key: str, chunk: list[dict] = chunk) -> float:
            return sum(r[key] for r in chunk) / len(chunk)

        print(f"| {chunk[0]['step']}-{chunk[-1]['step']} | {mean('reward_mean'):.3f} | "
              f"{mean('zero_signal_groups'):.2f} | {mean('kl'):.4f} | {mean('entropy'):.2f} | "
              f"{mean('answer_tokens'):.1f} |")
    passes = [(r["step"], r["pass_at_1"]) for r in rows if "pass_at_1" in r]
    print("\npass@1 (the run's held-out set, greedy): " + ", ".join(f"step {s}: {p:.2f}" for s, p in passes))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, help="the checkpoint GRPO started from")
    parser.add_argument("--after", required=True, help="the GRPO run directory")
    parser.add_argument("--tasks", nargs="+", default=["arithmetic"])
    parser.add_argument("--n", type=int, default=100, help="test questions per task")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--window", type=int, default=10, help="steps per row of the curve")
    args = parser.parse_args()
    torch.set_num_threads(1)
    accuracy_table([("before (SFT)", args.before), ("after GRPO", args.after)], args.tasks, args.n,
                   args.max_new_tokens)
    reward_curve(Path(args.after), args.window)


if __name__ == "__main__":
    main()
