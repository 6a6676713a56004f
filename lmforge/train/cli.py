"""`lmforge pretrain` and `lmforge sample`."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

from lmforge.cli import (
    add_run_args,
    config_from_args,
    finite_float,
    nonnegative_int,
    positive_int,
)
from lmforge.errors import Interrupted, UserError


def pretrain_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="SHARDS_DIR",
                        help="token shards made by `lmforge data prepare` (with manifest.json, tokenizer/)")
    add_run_args(parser, "run directory: metrics.jsonl, checkpoints/, tb/",
                 time_budget_help="finish within this wall-clock time, e.g. 15m: max_steps is sized "
                                  "from the throughput measured in the first steps (sets train.time_budget)")
    parser.add_argument("--auto-size", action="store_true",
                        help="with --time-budget: also pick the model size so that tokens ~ 20 x "
                             "parameters fit the budget (see `lmforge plan`)")
    parser.add_argument("--nproc", type=positive_int, metavar="N",
                        help="run on N local processes: re-runs this command under `torchrun "
                             "--standalone --nproc_per_node=N` (strategy: train.parallel)")


def pretrain_command(args: argparse.Namespace) -> int:
    if args.nproc is not None:
        from lmforge.distributed.launch import exec_torchrun

        exec_torchrun(args.nproc)
    from lmforge.runlock import run_lock

    with run_lock(args.out, "pretrain"):  # one writer per run directory (rank 0 holds it)
        return _pretrain(args)


def _pretrain(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import read_config
    from lmforge.train.checkpoint import resolve_resume
    from lmforge.train.pretrain import pretrain

    resume_from = resolve_resume(Path(args.out), args.resume)
    if resume_from is None:
        refuse_other_files(Path(args.out))
    base = None
    if resume_from:
        # The run continues with its own config; debug switches (fault injection) belong to the
        # invocation that sets them, so they are not inherited.
        base = read_config(resume_from).to_dict()
        del base["debug"]
    cfg = config_from_args(args, base=base)
    if args.time_budget and not resume_from:
        from lmforge.config import parse_duration

        parse_duration(args.time_budget, "--time-budget")
        cfg.train.time_budget = args.time_budget
    if args.auto_size:
        if not cfg.train.time_budget:
            raise UserError("--auto-size needs --time-budget (the model is sized to fit it)")
        if resume_from:
            raise UserError("--auto-size cannot change the model of a run being resumed")
        from lmforge.plan import auto_size

        cfg = auto_size(cfg, Path(args.data))
    from lmforge.commands import check_fits_in_memory

    check_fits_in_memory(cfg.model, "pretrain")
    result = pretrain(cfg, args.data, args.out, resume_from=resume_from)
    if result.stopped_by_signal:  # checkpointed; exit 130 / 143 so `... && next` does not go on
        raise Interrupted(result.signal or signal.SIGINT, saved=True)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only the main rank reports
        return 0
    val = f", val_loss {result.val_loss:.4f}, val_bpb {result.val_bpb:.4f}" if result.val_loss is not None else ""
    print(f"step {result.step}/{result.max_steps}, {result.tokens:,} tokens, loss "
          f"{result.loss if result.loss is None else round(result.loss, 4)}{val}; "
          f"checkpoint: {result.checkpoint}")
    return 0


# What a pre-training run directory holds; anything else in the --out of a new run is someone else's.
RUN_NAMES = {"config.toml", "metrics.jsonl", "tb", "checkpoints", "logs", ".lmforge.lock"}


def refuse_other_files(out: Path, extra: Iterable[str] = ()) -> None:
    """A new run writes config.toml and metrics.jsonl into --out: not into a folder of other files.
    `extra`: names a stage's run directory holds besides a pre-training run's."""
    if not out.is_dir() or (out / "stages.json").is_file():  # new, or an `lmforge run` directory
        return
    other = sorted(p.name for p in out.iterdir() if p.name not in RUN_NAMES | set(extra))
    if other:
        raise UserError(f"--out {out} holds files that are not a run's ({', '.join(other[:3])}"
                        f"{', ...' if len(other) > 3 else ''}); give a new directory, or --resume a run")


def sample_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint directory, or a run directory (its newest complete checkpoint)")
    parser.add_argument("--prompt", default="", help="text to continue (empty: start a new document)")
    parser.add_argument("--max-new-tokens", type=nonnegative_int, default=200)
    parser.add_argument("--temperature", type=finite_float, default=0.8, help="0 is greedy")
    parser.add_argument("--top-k", type=nonnegative_int, default=50, help="0 disables")
    parser.add_argument("--top-p", type=finite_float, default=0.95, help="1 disables")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the one-token decode step: ~2x faster decoding of small "
                             "models after a one-off compilation of tens of seconds")


def sample_command(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import load_model, read_config, resolve_checkpoint
    from lmforge.distributed.runtime import resolve_device
    from lmforge.engine import check_sampling, generate_text, prompt_ids
    from lmforge.tokenizer import load_tokenizer

    # Everything that can be refused is refused before the model is loaded or the prompt printed.
    check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    device = resolve_device(args.device, "--device")
    directory = resolve_checkpoint(args.checkpoint)
    if not (directory / "tokenizer").is_dir():
        raise UserError(f"{directory} has no tokenizer/ directory; sampling needs the model's tokenizer")
    tokenizer = load_tokenizer(directory / "tokenizer")
    model_cfg = read_config(directory).model
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise UserError(f"{directory}: its tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"model.vocab_size={model_cfg.vocab_size}; they do not belong together")
    max_seq_len = model_cfg.max_seq_len
    prompt_ids(tokenizer, args.prompt, max_seq_len)
    model = load_model(directory, device=device)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    sys.stdout.write(args.prompt)
    out = generate_text(model, tokenizer, args.prompt, args.max_new_tokens, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_text=show,
                        compile=args.compile)
    sys.stdout.write("\n")
    sys.stdout.flush()
    if out.stopped == "context":
        print(f"note: stopped after {len(out.token_ids)} new tokens at the model's context length "
              f"(model.max_seq_len={max_seq_len} tokens, prompt included), not at --max-new-tokens",
              file=sys.stderr)
    return 0
