"""Held-out accuracy of a base model (prompted few-shot) and of SFT checkpoints (chat prompt) on
the built-in verifiable questions, each answer checked by its task's `check` (greedy answers from
the Engine, calculator on: `lmforge.tasks.score.score_task`).

    python benchmarks/bench_sft_quality.py --base /tmp/sft_base --sft full=/tmp/sft_full lora=/tmp/sft_lora

Not a test: numbers for benchmarks/RESULTS.md ("SFT on the tiny model").
"""

from __future__ import annotations

import argparse
import time

import torch

TASKS = ("arithmetic", "letters", "shakespeare", "bible", "docstrings")


def main() -> None:
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.tasks import make_tasks
    from lmforge.tasks.score import score_task
    from lmforge.tokenizer import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base checkpoint or run directory")
    parser.add_argument("--sft", nargs="*", default=[], metavar="NAME=CKPT", help="fine-tuned checkpoints")
    parser.add_argument("--n", type=int, default=50, help="test questions per task")
    parser.add_argument("--few-shot", type=int, default=3, help="solved examples in the base model's prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--no-base", action="store_true", help="score the --sft checkpoints only")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), help="tasks to score")
    parser.add_argument("--show", type=int, default=0, help="print this many answers per task")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = make_tasks()
    models = [] if args.no_base else [(f"base {args.few_shot}-shot", args.base, args.few_shot)]
    models += [(*s.split("=", 1), 0) for s in args.sft]
    names = args.tasks
    print(f"| model | {' | '.join(names)} | mean |\n|---|{'---|' * (len(names) + 1)}")
    for name, path, shots in models:
        start = time.perf_counter()
        model = load_model(path)
        tokenizer = load_tokenizer(resolve_checkpoint(path) / "tokenizer")
        scores = [score_task(model, tokenizer, tasks[t], n=args.n, few_shot=shots,
                             max_new_tokens=args.max_new_tokens) for t in names]
        accuracies = [s.accuracy for s in scores]
        cells = " | ".join(f"{a:.0%}" for a in accuracies)
        print(f"| {name} | {cells} | {sum(accuracies) / len(accuracies):.0%} |"
              f"  <!-- {time.perf_counter() - start:.0f}s -->", flush=True)
        for score in scores:
            for example, text in score.answers[:args.show]:
                print(f"<!-- {score.task}: {example.prompt[-1]['content'][:60]!r} -> {text[:60]!r} -->")


if __name__ == "__main__":
    main()
