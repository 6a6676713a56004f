"""`lmforge sft`: fine-tune a checkpoint on conversations (full or LoRA), resumable."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from lmforge.cli import add_config_args, config_from_args
from lmforge.config import RunConfig
from lmforge.errors import Interrupted, UserError


def sft_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="base model: a checkpoint directory, or a run directory (its newest "
                             "complete checkpoint); its tokenizer must have the chat tokens")
    parser.add_argument("--data", action="append", metavar="SRC",
                        help="conversations (repeatable): a JSONL / Parquet file of OpenAI messages, "
                             "ShareGPT or Alpaca records, builtin:chat or builtin:arithmetic; SRC:WEIGHT mixes "
                             "(sets sft.data; default builtin:chat)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run directory: metrics.jsonl, checkpoints/, base.json, config.toml")
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue from RUN_DIR's newest complete checkpoint, or from CKPT")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help="finish within this wall-clock time, e.g. 5m (sets train.time_budget)")


def sft_command(args: argparse.Namespace) -> int:
    from lmforge.runlock import run_lock

    with run_lock(args.out, "sft"):  # one writer per run directory
        return _sft(args)


# What an SFT run directory holds besides a pre-training run's files.
SFT_RUN_NAMES = {"base.json"}


def _sft(args: argparse.Namespace) -> int:
    from lmforge.config import parse_duration
    from lmforge.finetune.data import sft_data
    from lmforge.finetune.lora import base_reference
    from lmforge.finetune.sft import read_base_record, sft
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
    data = sft_data(cfg.sft, cfg.train.seed)
    budget = parse_duration(cfg.train.time_budget, "train.time_budget") if cfg.train.time_budget and not resume_from else None
    result = sft(cfg, base, data, out, resume_from=resume_from, time_budget_s=budget)
    if result.stopped_by_signal:  # checkpointed; exit 130 / 143 like pretrain
        raise Interrupted(result.signal or signal.SIGINT, saved=True)
    val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"step {result.step}/{result.max_steps}, {result.tokens:,} tokens, loss {loss}{val}; "
          f"checkpoint: {result.checkpoint}")
    return 0


def _new_run_config(args: argparse.Namespace, base_dir: Path) -> RunConfig:
    """SFT defaults, the base's model and tokenizer sections, then --preset/--config/--set and
    --data. The architecture is the base's: a change to the model section is refused."""
    from lmforge.checkpoint import read_config
    from lmforge.finetune.sft import SFT_GUARD_DEFAULTS, SFT_TRAIN_DEFAULTS

    base_cfg = read_config(base_dir)
    fixed = {"model": base_cfg.to_dict()["model"], "tokenizer": base_cfg.to_dict()["tokenizer"]}
    cfg = config_from_args(args, base={**fixed, "train": dict(SFT_TRAIN_DEFAULTS),
                                       "guard": dict(SFT_GUARD_DEFAULTS)})
    if args.data:
        cfg.sft.data = list(args.data)
        cfg.validate()
    keep_base_architecture(cfg, base_cfg, base_dir)
    return cfg


def _resumed_config(args: argparse.Namespace, resume_from: Path) -> RunConfig:
    """The run's own config (as pretrain: the debug section belongs to the invocation)."""
    from lmforge.checkpoint import read_config

    saved = read_config(resume_from)
    base = saved.to_dict()
    del base["debug"]
    cfg = config_from_args(args, base=base)
    if args.data and list(args.data) != cfg.sft.data:
        raise UserError(f"--data {' '.join(args.data)}: a resumed run continues on its own data "
                        f"({' '.join(cfg.sft.data)}); drop --data or start a new --out")
    keep_base_architecture(cfg, saved, resume_from)
    if cfg.lora != saved.lora:
        raise UserError("a resumed run keeps its lora section; start a new --out to change it")
    return cfg


def keep_base_architecture(cfg: RunConfig, base_cfg: RunConfig, source: Path, command: str = "sft") -> None:
    """Fine-tuning stages (sft, dpo, grpo) train their base's architecture: a model section that
    differs (a --preset, a --set model.*) is refused, naming the first differing field."""
    if cfg.model != base_cfg.model:
        changed = next(k for k, v in cfg.to_dict()["model"].items() if base_cfg.to_dict()["model"][k] != v)
        raise UserError(f"model.{changed}: {command} keeps the model of its base checkpoint {source}; "
                        "drop that setting (or a --preset that sets it)")
