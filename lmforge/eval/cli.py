"""`lmforge eval --checkpoint CKPT --tasks LIST [--limit N] [--shots K] [--batch-size B] [--out F]`.

Where results go: `--out FILE`; without it, a checkpoint of a run directory (the run directory
itself, or one of its RUN_DIR/checkpoints/step_N) writes RUN_DIR/eval/step_N.json, merged with
what earlier evaluations of that checkpoint wrote there (a task run again replaces its entry).
`lmforge report` reads those files (lmforge/report/collect.py: `evaluation`).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.eval.generation import FORMATS
from lmforge.outputs import add_force_arg, check_output

RESULTS_DIR = "eval"  # RUN_DIR/eval/<checkpoint>.json: results of a run's checkpoints


def eval_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    parser.add_argument("--tasks", required=True, metavar="LIST",
                        help="comma-separated tasks or groups: core, all, mmlu, mmlu_<subject>, "
                             "arc_easy, arc_challenge, hellaswag, piqa, winogrande, boolq, lambada, bpb, "
                             "gsm8k, humaneval, mbpp, chat")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="first N items per task (chat: N questions per builtin:chat task)")
    parser.add_argument("--shots", type=int, default=None, metavar="K",
                        help="few-shot examples per item (default: 0; gsm8k base prompts 8)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="prompt format: base (plain text), chat (the chat format for generation "
                             "tasks), letters (chat, and multiple choice answered with a letter); "
                             "auto: chat for an SFT/aligned checkpoint, else base")
    parser.add_argument("--samples", type=int, default=1, metavar="N",
                        help="humaneval/mbpp: completions per problem; pass@k for k <= N")
    parser.add_argument("--temperature", type=float, default=None, metavar="T",
                        help="generation temperature (default: greedy; 0.8 with --samples > 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="generation length cap (default: gsm8k and code 512, chat 64)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed of generation tasks")
    parser.add_argument("--batch-size", type=int, default=32, metavar="B",
                        help="contexts per forward pass")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE",
                        help="write results as JSON (default for a run's checkpoint: "
                             "RUN_DIR/eval/<checkpoint>.json, merged)")
    parser.add_argument("--records", action="store_true",
                        help="keep per-item records (log-likelihoods, prediction) in the JSON")
    parser.add_argument("--bpb-data", type=Path, default=None, metavar="PATH",
                        help="for bpb: a text file, or a shards directory (its val split)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_force_arg(parser)


def load_for_eval(checkpoint: str | os.PathLike, device: str = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) of a checkpoint; one clear error if it has no tokenizer."""
    from lmforge.checkpoint import TOKENIZER_DIR, load_model, resolve_checkpoint
    from lmforge.tokenizer import load_tokenizer

    directory = resolve_checkpoint(checkpoint)
    if not (directory / TOKENIZER_DIR).is_dir():
        raise UserError(f"{directory} has no {TOKENIZER_DIR}/ directory; evaluation needs the "
                        "model's tokenizer")
    return load_model(directory, device=device), load_tokenizer(directory / TOKENIZER_DIR)


def select_tasks(spec: str, bpb_data: Path | None) -> list[str]:
    """Tasks of `--tasks`; a group leaves out what cannot run (bpb without data)."""
    from lmforge.eval.tasks import BPB, GROUPS, resolve_tasks

    explicit = {w.strip() for w in spec.split(",")} - set(GROUPS)
    tasks = []
    for name in resolve_tasks(spec):
        runnable = name != BPB or bpb_data
        if runnable or name in explicit:  # named on its own: `evaluate` says why it cannot run
            tasks.append(name)
    return tasks


def format_table(results: dict[str, Any]) -> str:
    """One line per task: its metrics, items, shots and seconds."""
    def fmt(value: Any) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    lines = [f"{'task':<16} {'acc':>8} {'acc_norm':>9} {'stderr':>8} {'other':>18} {'items':>6} "
             f"{'shots':>5} {'seconds':>8}"]
    for name, m in results["results"].items():
        other = " ".join(f"{k}={m[k]:.4g}" for k in m if k in ("perplexity", "bpb") or k.startswith("pass@"))
        lines.append(f"{name:<16} {fmt(m.get('acc')):>8} {fmt(m.get('acc_norm')):>9} "
                     f"{fmt(m.get('stderr')):>8} {other:>18} {m['items']:>6} {m['shots']:>5} "
                     f"{m['seconds']:>8.1f}")
        for task, acc in m.get("tasks", {}).items():  # chat: each builtin:chat task
            lines.append(f"  {task:<14} {fmt(acc):>8}")
    if results.get("core"):
        lines.append(f"CORE (centred mean over {len(results['core']['tasks'])} core tasks): "
                     f"{results['core']['centered']:.4f}")
    return "\n".join(lines)


def default_out(checkpoint: str | os.PathLike) -> Path | None:
    """RUN_DIR/eval/<checkpoint>.json for a checkpoint of a run directory, else None."""
    from lmforge.checkpoint import resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    if directory.parent.name != "checkpoints":
        return None
    return directory.parent.parent / RESULTS_DIR / f"{directory.name}.json"


def merged(previous: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Earlier results of the same checkpoint, updated with these (their tasks replaced)."""
    import json

    from lmforge.eval.runner import core_score

    try:
        old = json.loads(previous.read_text(encoding="utf-8"))
        tasks = {**old["results"], **results["results"]}
    except (OSError, ValueError, KeyError, TypeError):
        return results  # unreadable or absent: these results alone
    return {**results, "results": tasks, "core": core_score(tasks)}


def eval_command(args: argparse.Namespace) -> int:
    import sys

    from lmforge.atomic import atomic_write_json
    from lmforge.eval.generation import resolve_format
    from lmforge.eval.runner import EvalOptions, evaluate

    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit}: must be a positive number of items")
    if args.out is not None:
        check_output(args.out, args.force, directory=False)
    tasks = select_tasks(args.tasks, args.bpb_data)
    out = args.out or default_out(args.checkpoint)
    model, tokenizer = load_for_eval(args.checkpoint, args.device)
    prompt_format = resolve_format(args.format, args.checkpoint, tokenizer)
    options = EvalOptions(limit=args.limit, shots=args.shots, batch_size=args.batch_size,
                          records=args.records, progress=sys.stderr.isatty(), bpb_data=args.bpb_data,
                          format=prompt_format, samples=args.samples, temperature=args.temperature,
                          max_new_tokens=args.max_new_tokens, seed=args.seed)
    results = evaluate(model, tokenizer, tasks, options)
    results["config"] = {"checkpoint": str(args.checkpoint), "tasks": tasks, "limit": args.limit,
                         "shots": args.shots, "batch_size": args.batch_size, "format": prompt_format,
                         "samples": args.samples, "temperature": args.temperature, "seed": args.seed}
    print(format_table(results))
    if out is not None:
        if args.out is None:
            results = merged(out, results)
            out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, results)
        print(f"results written to {out}")
    return 0
