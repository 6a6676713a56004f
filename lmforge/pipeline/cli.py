"""`lmforge run`: the whole lifecycle in one command."""

from __future__ import annotations

import argparse
import sys

from lmforge.cli import add_config_args, config_from_args

DEFAULT_BUDGET = "20m"


def run_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", metavar="RUN_DIR",
                        help="run directory (default: runs/PRESET); running again continues it")
    parser.add_argument("--source", action="extend", nargs="+", default=[], metavar="PATH",
                        help="your own text: files, directories, globs, JSONL, Parquet "
                             "(replaces data.sources; default: builtin:default)")
    parser.add_argument("--time-budget", default=DEFAULT_BUDGET, metavar="DURATION",
                        help=f"wall-clock budget of the whole run, e.g. 15m or 1h (default "
                             f"{DEFAULT_BUDGET}); pre-training, SFT and alignment share what the "
                             "other stages leave (run.*_share). 'none': each trains for its "
                             "train.max_steps")
    parser.add_argument("--until", metavar="STAGE",
                        help="run the stages up to and including STAGE (data, tokenizer, shards, "
                             "pretrain, sft, align, eval, sample, chat, export, report)")
    add_config_args(parser)


def run_command(args: argparse.Namespace) -> int:
    from lmforge.config import parse_duration
    from lmforge.pipeline.run import run_pipeline
    from lmforge.runlock import run_lock

    cfg = config_from_args(args)
    if args.source:
        cfg.data.sources = list(args.source)
        cfg.validate()
    cfg.hold_out_one_evaluation()  # a small --source still gets a validation split the trainer can use
    from lmforge.commands import check_fits_in_memory

    check_fits_in_memory(cfg.model, "run")  # before the data stages spend their time
    budget = args.time_budget.strip().lower()
    budget_s = None if budget in ("none", "0", "") else parse_duration(budget, "--time-budget")
    out = args.out or f"runs/{args.preset or 'default'}"
    try:
        with run_lock(out, "run"):
            report = run_pipeline(cfg, out, budget_s, until=args.until)
    except KeyboardInterrupt as e:  # Interrupted (SIGINT/SIGTERM in training) carries 130 / 143
        print(f"interrupted; run the same command again to continue where it stopped (in {out})",
              file=sys.stderr)
        return getattr(e, "exit_code", 130)
    if (report / "report.pdf").is_file():
        print(f"report: {report / 'report.html'}")
        print(f"        {report / 'report.md'}")
        print(f"        {report / 'report.pdf'}")
    print_model_commands(out)
    return 0


def print_model_commands(out: str) -> None:
    """Where the run's final model is, and the commands that talk to it."""
    from lmforge.checkpoint import resolve_checkpoint
    from lmforge.errors import UserError

    try:
        model = resolve_checkpoint(out)
    except UserError:  # --until stopped before pre-training made a model
        return
    print(f"model:  {model}")
    print(f"talk to it: lmforge chat --checkpoint {out}")
    print(f"            lmforge serve --checkpoint {out}")
