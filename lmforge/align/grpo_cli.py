"""`lmforge grpo`: RL with verifiable rewards from a chat checkpoint, resumable."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from lmforge.cli import add_config_args, config_from_args
from lmforge.config import RunConfig
from lmforge.errors import Interrupted, UserError


def grpo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="the policy to start from (usually an SFT run): a checkpoint directory, "
                             "or a run directory (its newest complete checkpoint)")
    parser.add_argument("--tasks", metavar="LIST",
                        help="comma-separated built-in tasks whose checker is the reward, e.g. "
                             "arithmetic,letters, or chat for every verifiable one (sets grpo.tasks; "
                             "default chat)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run directory: metrics.jsonl, checkpoints/, base.json, config.toml")
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue from RUN_DIR's newest complete checkpoint, or from CKPT")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help="finish within this wall-clock time, e.g. 5m (sets train.time_budget)")


def grpo_command(args: argparse.Namespace) -> int:
    from lmforge.runlock import run_lock

    with run_lock(args.out, "grpo"):  # one writer per run directory
        return _grpo(args)


def _grpo(args: argparse.Namespace) -> int:
    from lmforge.align.grpo import grpo, resolve_tasks
    from lmforge.config import parse_duration
    from lmforge.finetune.cli import SFT_RUN_NAMES
    from lmforge.finetune.lora import base_reference
    from lmforge.finetune.sft import read_base_record
    from lmforge.train.checkpoint import resolve_resume
    from lmforge.train.cli import refuse_other_files

    out = Path(args.out)
    resume_from = resolve_resume(out, args.resume)
    base = base_reference(args.checkpoint)
    if resume_from is None:
        refuse_other_files(out, extra=SFT_RUN_NAMES)
        cfg = _new_run_config(args, base.checkpoint)
        if args.time_budget:
            parse_duration(args.time_budget, "--time-budget")
            cfg.train.time_budget = args.time_budget
    else:
        recorded = read_base_record(out)
        if recorded.sha256 != base.sha256:
            raise UserError(f"--checkpoint {args.checkpoint} is not the base this run started from "
                            f"({recorded.checkpoint}, recorded in {out / 'base.json'})")
        cfg = _resumed_config(args, resume_from)
    tasks = resolve_tasks(cfg.grpo.tasks, cfg.grpo.reward_model)
    budget = parse_duration(cfg.train.time_budget, "train.time_budget") if cfg.train.time_budget and not resume_from else None
    result = grpo(cfg, base, tasks, out, resume_from=resume_from, time_budget_s=budget)
    if result.stopped_by_signal:  # checkpointed; exit 130 / 143 like pretrain
        raise Interrupted(result.signal or signal.SIGINT, saved=True)
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"step {result.step}/{result.max_steps}, loss {loss}; checkpoint: {result.checkpoint}")
    return 0


def _tasks(args: argparse.Namespace) -> list[str] | None:
    return [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None


def _new_run_config(args: argparse.Namespace, base_dir: Path) -> RunConfig:
    """GRPO defaults, the base's model and tokenizer sections, then --preset/--config/--set and
    --tasks. The architecture is the base's: a change to the model section is refused."""
    from lmforge.align.grpo import GRPO_GUARD_DEFAULTS, GRPO_TRAIN_DEFAULTS, keep_base_model
    from lmforge.checkpoint import read_config

    base_cfg = read_config(base_dir).to_dict()
    cfg = config_from_args(args, base={"model": base_cfg["model"], "tokenizer": base_cfg["tokenizer"],
                                       "train": dict(GRPO_TRAIN_DEFAULTS), "guard": dict(GRPO_GUARD_DEFAULTS)})
    if _tasks(args):
        cfg.grpo.tasks = _tasks(args)
        cfg.validate()
    keep_base_model(cfg, base_dir)
    return cfg


def _resumed_config(args: argparse.Namespace, resume_from: Path) -> RunConfig:
    """The run's own config (the debug section belongs to the invocation)."""
    from lmforge.align.grpo import keep_base_model
    from lmforge.checkpoint import read_config

    saved = read_config(resume_from)
    base = saved.to_dict()
    del base["debug"]
    cfg = config_from_args(args, base=base)
    if _tasks(args) and _tasks(args) != cfg.grpo.tasks:
        raise UserError(f"--tasks {args.tasks}: a resumed run continues on its own tasks "
                        f"({','.join(cfg.grpo.tasks)}); drop --tasks or start a new --out")
    keep_base_model(cfg, resume_from)
    if cfg.lora != saved.lora or cfg.grpo != saved.grpo:
        raise UserError("a resumed run keeps its lora and grpo sections; start a new --out to change them")
    return cfg
