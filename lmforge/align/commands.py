"""`lmforge dpo`, `lmforge reward train` and `lmforge reward score`.

The two training commands share one shape with `lmforge sft`: a policy checkpoint in (its model
and tokenizer sections kept), the stage's train defaults, then --preset / --config / --set and
--data (the stage's `data` field), a run directory out, `--resume` and `--time-budget`.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.cli import add_config_args
from lmforge.config import RunConfig
from lmforge.errors import Interrupted, UserError

# What a DPO / reward-model run directory holds besides a pre-training run's files.
RUN_NAMES = {"base.json", "prefs", "reference_logps.safetensors"}


@dataclass(frozen=True)
class Stage:
    command: str  # "dpo", "reward train"
    section: str  # its config section, holding `data`
    defaults: str  # "module:NAME" of its train defaults
    guard: str  # "module:NAME" of its guard defaults
    train: str  # "module:function" (cfg, base, run_dir, resume_from=, time_budget_s=) -> TrainResult


GUARD = "lmforge.align.dpo:PREFERENCE_GUARD_DEFAULTS"
DPO = Stage("dpo", "dpo", "lmforge.align.dpo:DPO_TRAIN_DEFAULTS", GUARD, "lmforge.align.dpo:dpo")
REWARD = Stage("reward train", "reward", "lmforge.align.reward:REWARD_TRAIN_DEFAULTS", GUARD,
               "lmforge.align.reward:train_reward_model")


def _resolve(target: str) -> Any:
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def policy_base(checkpoint: str | Path):
    """The base a stage starts from: a policy checkpoint (never a reward model), hashed."""
    from lmforge.checkpoint import refuse_reward_model, resolve_checkpoint
    from lmforge.finetune.lora import base_reference

    refuse_reward_model(resolve_checkpoint(checkpoint))
    return base_reference(checkpoint)


def check_recorded_base(run_dir: Path, base, given: str) -> None:
    from lmforge.finetune.sft import BASE_RECORD, read_base_record

    recorded = read_base_record(run_dir)
    if recorded.sha256 != base.sha256:
        raise UserError(f"--checkpoint {given} is not the base this run started from "
                        f"({recorded.checkpoint}, recorded in {run_dir / BASE_RECORD})")


# -- the training commands ---------------------------------------------------------------------


def _train_args(parser: argparse.ArgumentParser, stage: Stage, data_help: str) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT",
                        help="the policy to start from: a checkpoint directory, or a run directory "
                             "(its newest complete checkpoint); its tokenizer must have the chat tokens")
    parser.add_argument("--data", action="append", metavar="SRC",
                        help=f"{data_help} (repeatable; SRC:WEIGHT mixes; sets {stage.section}.data; "
                             "default builtin:prefs)")
    parser.add_argument("--out", required=True, metavar="RUN_DIR",
                        help="run directory: metrics.jsonl, checkpoints/, base.json, config.toml")
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue from RUN_DIR's newest complete checkpoint, or from CKPT")
    parser.add_argument("--time-budget", metavar="DURATION",
                        help="finish within this wall-clock time, e.g. 5m (sets train.time_budget)")


PAIRS_HELP = ("preference pairs: a JSONL file of {prompt, chosen, rejected} records, or builtin:prefs "
              "(answers sampled from the policy, judged by the verifiable tasks)")


def dpo_args(parser: argparse.ArgumentParser) -> None:
    _train_args(parser, DPO, PAIRS_HELP)


def dpo_command(args: argparse.Namespace) -> int:
    return _train_command(args, DPO)


def reward_train_args(parser: argparse.ArgumentParser) -> None:
    _train_args(parser, REWARD, PAIRS_HELP)


def reward_train_command(args: argparse.Namespace) -> int:
    return _train_command(args, REWARD)


def _train_command(args: argparse.Namespace, stage: Stage) -> int:
    from lmforge.config import parse_duration
    from lmforge.runlock import run_lock
    from lmforge.train.checkpoint import resolve_resume
    from lmforge.train.cli import refuse_other_files

    out = Path(args.out)
    with run_lock(out, stage.command.split()[0]):  # one writer per run directory
        resume_from = resolve_resume(out, args.resume)
        base = policy_base(args.checkpoint)
        if resume_from is None:
            refuse_other_files(out, extra=RUN_NAMES)
            cfg = _new_run_config(args, base.checkpoint, stage)
            if args.time_budget:
                parse_duration(args.time_budget, "--time-budget")
                cfg.train.time_budget = args.time_budget
        else:
            check_recorded_base(out, base, args.checkpoint)
            cfg = _resumed_config(args, resume_from, stage)
        budget = (parse_duration(cfg.train.time_budget, "train.time_budget")
                  if cfg.train.time_budget and not resume_from else None)
        result = _resolve(stage.train)(cfg, base, out, resume_from=resume_from, time_budget_s=budget)
    if result.stopped_by_signal:  # checkpointed; exit 130 / 143 like pretrain
        raise Interrupted(result.signal or signal.SIGINT, saved=True)
    val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"step {result.step}/{result.max_steps}, {result.tokens:,} tokens, loss {loss}{val}; "
          f"checkpoint: {result.checkpoint}")
    return 0


def _new_run_config(args: argparse.Namespace, base_dir: Path, stage: Stage) -> RunConfig:
    """The stage's train and guard defaults, the base's model and tokenizer sections, then
    --preset / --config / --set and --data. The architecture stays the base's."""
    from lmforge.checkpoint import read_config
    from lmforge.cli import config_from_args
    from lmforge.finetune.cli import keep_base_architecture

    base_cfg = read_config(base_dir)
    fixed = {"model": base_cfg.to_dict()["model"], "tokenizer": base_cfg.to_dict()["tokenizer"]}
    defaults = {"train": dict(_resolve(stage.defaults)), "guard": dict(_resolve(stage.guard))}
    cfg = config_from_args(args, base={**fixed, **defaults})
    if args.data:
        getattr(cfg, stage.section).data = list(args.data)
        cfg.validate()
    keep_base_architecture(cfg, base_cfg, base_dir, stage.command)
    return cfg


def _resumed_config(args: argparse.Namespace, resume_from: Path, stage: Stage) -> RunConfig:
    """The run's own config (the debug section belongs to the invocation)."""
    from lmforge.checkpoint import read_config
    from lmforge.cli import config_from_args
    from lmforge.finetune.cli import keep_base_architecture

    saved = read_config(resume_from)
    base = saved.to_dict()
    del base["debug"]
    cfg = config_from_args(args, base=base)
    data = getattr(cfg, stage.section).data
    if args.data and list(args.data) != data:
        raise UserError(f"--data {' '.join(args.data)}: a resumed run continues on its own data "
                        f"({' '.join(data)}); drop --data or start a new --out")
    keep_base_architecture(cfg, saved, resume_from, stage.command)
    if cfg.lora != saved.lora:
        raise UserError("a resumed run keeps its lora section; start a new --out to change it")
    return cfg


# -- lmforge reward score ----------------------------------------------------------------------


def reward_score_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="RM",
                        help="a reward model (checkpoint or `lmforge reward train` run directory)")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="JSONL: {prompt, answer} records (one score each) or {prompt, chosen, "
                             "rejected} pairs (both scored; the pairwise accuracy is printed)")
    parser.add_argument("--out", metavar="FILE", help="write the scored records here (default: stdout)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def reward_score_command(args: argparse.Namespace) -> int:
    from lmforge.align.reward import load_reward_model
    from lmforge.atomic import atomic_write_text

    model = load_reward_model(args.checkpoint, args.device)
    records, rows = _scoring_rows(Path(args.data), model.tokenizer)
    scores = iter(model.score_rows([r for pair in rows for r in pair]))
    wins = 0
    for record, pair in zip(records, rows, strict=True):
        if len(pair) == 1:
            record["score"] = next(scores)
        else:
            record["chosen_score"], record["rejected_score"] = next(scores), next(scores)
            wins += record["chosen_score"] > record["rejected_score"]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    if args.out:
        atomic_write_text(args.out, text)
    else:
        sys.stdout.write(text)
    pairs = sum(len(pair) == 2 for pair in rows)
    if pairs:
        print(f"pairwise accuracy {wins / pairs:.4f} ({wins} of {pairs} pairs: chosen scored higher)",
              file=sys.stderr)
    return 0


def _scoring_rows(path: Path, tokenizer: Any) -> tuple[list[dict], list[list[list[int]]]]:
    """Each record and the token rows to score: [answer] or [chosen, rejected]."""
    from lmforge.align.pairs import render_answer, require_fields, to_answer, to_pair
    from lmforge.finetune.data import jsonl_records

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    records, rows = [], []
    for line, record in jsonl_records(path):
        try:
            if isinstance(record, Exception):
                raise record
            if isinstance(record, dict) and "answer" in record:
                require_fields(record, ("prompt", "answer"))
                prompt, answer = to_answer(record["prompt"], record["answer"])
                answers = [answer]
            else:
                pair = to_pair(record)
                prompt, answers = pair.prompt, [pair.chosen, pair.rejected]
        except ValueError as e:
            raise UserError(f"{path}:{line}: {e}") from None
        records.append(record)
        rows.append([render_answer(tokenizer, prompt, a)[0] for a in answers])
    if not records:
        raise UserError(f"{path}: no records in it")
    return records, rows


__all__ = ["DPO", "REWARD", "RUN_NAMES", "check_recorded_base", "dpo_args", "dpo_command", "policy_base",
           "reward_score_args", "reward_score_command", "reward_train_args", "reward_train_command"]

