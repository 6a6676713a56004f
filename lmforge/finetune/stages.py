"""The stages that train a checkpoint further - `lmforge sft`, `dpo`, `reward train`, `grpo` - as
rows of one table, and the one command flow they share.

Each takes a policy checkpoint (its model and tokenizer sections kept), starts from the stage's own
train and guard defaults, then --preset / --config / --set and its inputs flag (--data, or --tasks
for grpo), writes a run directory (--out) that records its base (base.json), and continues with
--resume on its own config. `lmforge run` starts its sft and align stages from the same defaults
(lmforge/pipeline/posttrain.py reads them from this table) and calls `run_stage` for alignment.
"""

from __future__ import annotations

import argparse
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmforge.cli import add_run_args
from lmforge.config import RunConfig
from lmforge.errors import Interrupted, UserError

# What a fine-tuning run directory holds besides a pre-training run's files.
BASE_NAMES = frozenset({"base.json"})
PAIRS_NAMES = BASE_NAMES | {"prefs", "reference_logps.safetensors"}  # DPO / reward model runs


@dataclass(frozen=True)
class Stage:
    command: str  # "sft", "dpo", "reward train", "grpo"
    section: str  # its config section, holding the inputs field
    inputs: str  # that field: "data" (--data SRC, repeatable) or "tasks" (--tasks A,B)
    train_defaults: str  # "module:NAME" of its train.* defaults
    guard_defaults: str  # "module:NAME" of its guard.* defaults
    train: str  # "module:function" (cfg, base, run_dir, resume_from=, time_budget_s=) -> TrainResult
    run_names: frozenset[str]  # what its run directory holds besides a pre-training run's
    inputs_help: str  # the inputs flag's help
    # What a resumed run keeps as it was: sections ("lora"), or a section's fields by prefix
    # ("dpo.prefs_": builtin:prefs pairs are sampled once, with those settings).
    kept: tuple[str, ...] = ("lora",)


PREFERENCE_GUARD = "lmforge.align.dpo:PREFERENCE_GUARD_DEFAULTS"


def _pairs_help(section: str) -> str:
    return ("preference pairs: a JSONL file of {prompt, chosen, rejected} records, or builtin:prefs "
            "(answers sampled from the policy, judged by the verifiable tasks) (repeatable; SRC:WEIGHT "
            f"mixes; sets {section}.data; default builtin:prefs)")


SFT = Stage("sft", "sft", "data", "lmforge.finetune.sft:SFT_TRAIN_DEFAULTS",
            "lmforge.finetune.sft:SFT_GUARD_DEFAULTS", "lmforge.finetune.stages:train_sft", BASE_NAMES,
            "conversations (repeatable): a JSONL / Parquet file of OpenAI messages, ShareGPT or Alpaca "
            "records, builtin:chat or builtin:arithmetic; SRC:WEIGHT mixes (sets sft.data; default "
            "builtin:chat)")
DPO = Stage("dpo", "dpo", "data", "lmforge.align.dpo:DPO_TRAIN_DEFAULTS", PREFERENCE_GUARD,
            "lmforge.align.dpo:dpo", PAIRS_NAMES, _pairs_help("dpo"), kept=("lora", "dpo.prefs_"))
REWARD = Stage("reward train", "reward", "data", "lmforge.align.reward:REWARD_TRAIN_DEFAULTS",
               PREFERENCE_GUARD, "lmforge.align.reward:train_reward_model", PAIRS_NAMES,
               _pairs_help("reward"))
GRPO = Stage("grpo", "grpo", "tasks", "lmforge.align.grpo:GRPO_TRAIN_DEFAULTS",
             "lmforge.align.grpo:GRPO_GUARD_DEFAULTS", "lmforge.finetune.stages:train_grpo", BASE_NAMES,
             "comma-separated built-in tasks whose checker is the reward, e.g. arithmetic,letters, or "
             "chat for every verifiable one (sets grpo.tasks; default chat)", kept=("lora", "grpo"))
STAGES = {stage.command: stage for stage in (SFT, DPO, REWARD, GRPO)}


def resolve(target: str) -> Any:
    """The object a "module:NAME" of the table names (imported when first needed)."""
    import importlib

    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


# -- the stages' training functions, in the table's one signature --------------------------------


def train_sft(cfg: RunConfig, base: Any, run_dir: Path, resume_from: Path | None = None,
              time_budget_s: float | None = None) -> Any:
    from lmforge.finetune.data import sft_data
    from lmforge.finetune.sft import sft

    data = sft_data(cfg.sft, cfg.train.seed)
    return sft(cfg, base, data, run_dir, resume_from=resume_from, time_budget_s=time_budget_s)


def train_grpo(cfg: RunConfig, base: Any, run_dir: Path, resume_from: Path | None = None,
               time_budget_s: float | None = None) -> Any:
    from lmforge.align.grpo import grpo, resolve_tasks

    tasks = resolve_tasks(cfg.grpo.tasks, cfg.grpo.reward_model)
    return grpo(cfg, base, tasks, run_dir, resume_from=resume_from, time_budget_s=time_budget_s)


# -- bases -------------------------------------------------------------------------------------


def policy_base(checkpoint: str | Path) -> Any:
    """The base a stage starts from: a policy checkpoint (never a reward model), hashed."""
    from lmforge.checkpoint import refuse_reward_model, resolve_checkpoint
    from lmforge.finetune.lora import base_reference

    refuse_reward_model(resolve_checkpoint(checkpoint))
    return base_reference(checkpoint)


def check_recorded_base(run_dir: Path, base: Any, given: str) -> None:
    """A resumed run goes on from the base it started from (RUN_DIR/base.json)."""
    from lmforge.finetune.sft import BASE_RECORD, read_base_record

    recorded = read_base_record(run_dir)
    if recorded.sha256 != base.sha256:
        raise UserError(f"--checkpoint {given} is not the base this run started from "
                        f"({recorded.checkpoint}, recorded in {run_dir / BASE_RECORD})")


# -- the command ---------------------------------------------------------------------------------


def stage_args(parser: argparse.ArgumentParser, stage: Stage, checkpoint_help: str) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="CKPT", help=checkpoint_help)
    if stage.inputs == "tasks":
        parser.add_argument("--tasks", metavar="LIST", help=stage.inputs_help)
    else:
        parser.add_argument("--data", action="append", metavar="SRC", help=stage.inputs_help)
    add_run_args(parser, "run directory: metrics.jsonl, checkpoints/, base.json, config.toml")


def stage_command(args: argparse.Namespace, stage: Stage) -> int:
    from lmforge.config import parse_duration
    from lmforge.runlock import run_lock
    from lmforge.train.checkpoint import resolve_resume
    from lmforge.train.cli import refuse_other_files

    out = Path(args.out)
    with run_lock(out, stage.command.split()[0]):  # one writer per run directory
        resume_from = resolve_resume(out, args.resume)
        base = policy_base(args.checkpoint)
        if resume_from is None:
            refuse_other_files(out, extra=stage.run_names)
            cfg = _new_run_config(args, base.checkpoint, stage)
            if args.time_budget:
                parse_duration(args.time_budget, "--time-budget")
                cfg.train.time_budget = args.time_budget
        else:
            check_recorded_base(out, base, args.checkpoint)
            cfg = _resumed_config(args, resume_from, stage)
        # A resumed run already holds the max_steps its budget was sized to.
        budget = (parse_duration(cfg.train.time_budget, "train.time_budget")
                  if cfg.train.time_budget and not resume_from else None)
        result = resolve(stage.train)(cfg, base, out, resume_from=resume_from, time_budget_s=budget)
    if result.stopped_by_signal:  # checkpointed; exit 130 / 143 like pretrain
        raise Interrupted(result.signal or signal.SIGINT, saved=True)
    val = f", val_loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    print(f"step {result.step}/{result.max_steps}, {result.tokens:,} tokens, loss {loss}{val}; "
          f"checkpoint: {result.checkpoint}")
    return 0


def _given_inputs(args: argparse.Namespace, stage: Stage) -> list[str] | None:
    """The inputs flag's values: --data SRC ... or --tasks A,B; None when not given."""
    if stage.inputs == "tasks":
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else []
        return tasks or None
    return list(args.data) if args.data else None


def _new_run_config(args: argparse.Namespace, base_dir: Path, stage: Stage) -> RunConfig:
    """The stage's train and guard defaults, the base's model and tokenizer sections, then
    --preset / --config / --set and the inputs flag. The architecture stays the base's."""
    from lmforge.checkpoint import read_config
    from lmforge.cli import config_from_args
    from lmforge.finetune.cli import keep_base_architecture

    base_cfg = read_config(base_dir)
    fixed = {"model": base_cfg.to_dict()["model"], "tokenizer": base_cfg.to_dict()["tokenizer"]}
    defaults = {"train": dict(resolve(stage.train_defaults)), "guard": dict(resolve(stage.guard_defaults))}
    cfg = config_from_args(args, base={**fixed, **defaults})
    given = _given_inputs(args, stage)
    if given:
        setattr(getattr(cfg, stage.section), stage.inputs, given)
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
    own = getattr(getattr(cfg, stage.section), stage.inputs)
    given = _given_inputs(args, stage)
    if given and given != own:
        flag, sep = ("--tasks", ",") if stage.inputs == "tasks" else ("--data", " ")
        shown = args.tasks if stage.inputs == "tasks" else " ".join(args.data)
        raise UserError(f"{flag} {shown}: a resumed run continues on its own {stage.inputs} "
                        f"({sep.join(own)}); drop {flag} or start a new --out")
    keep_base_architecture(cfg, saved, resume_from, stage.command)
    _keep_sections(cfg, saved, stage)
    return cfg


def _keep_sections(cfg: RunConfig, saved: RunConfig, stage: Stage) -> None:
    """Refuse a resumed run whose --set / --config changed what it keeps (Stage.kept)."""
    sections = [name for name in stage.kept if "." not in name]
    if any(getattr(cfg, name) != getattr(saved, name) for name in sections):
        many = len(sections) > 1
        raise UserError(f"a resumed run keeps its {' and '.join(sections)} section{'s' if many else ''}; "
                        f"start a new --out to change {'them' if many else 'it'}")
    for group in (name for name in stage.kept if "." in name):
        section, prefix = group.split(".")
        ours, theirs = cfg.to_dict()[section], saved.to_dict()[section]
        changed = [key for key in ours if key.startswith(prefix) and ours[key] != theirs.get(key)]
        if changed:
            raise UserError(f"{section}.{changed[0]}: a resumed run keeps the {group}* settings it "
                            "started with; start a new --out to change them")


# -- the lifecycle's entry ---------------------------------------------------------------------


def run_stage(stage: Stage, cfg: RunConfig, checkpoint: str | Path, run_dir: str | Path,
              resume: bool = False) -> Any:
    """A stage for a caller holding a config (the lifecycle): its inputs from cfg's section, the
    time budget from cfg.train.time_budget (a resumed run's too: the caller sized it), the train
    settings as given, cfg.model the checkpoint's. With `resume`, a run directory holding a
    complete checkpoint continues from its newest one (from the same base); else it starts afresh."""
    from lmforge.checkpoint import read_config
    from lmforge.config import parse_duration
    from lmforge.finetune.cli import keep_base_architecture
    from lmforge.train.checkpoint import CheckpointManager

    run_dir = Path(run_dir)
    base = policy_base(checkpoint)
    keep_base_architecture(cfg, read_config(base.checkpoint), base.checkpoint, stage.command)
    resume_from = CheckpointManager(run_dir, 1).latest() if resume else None
    if resume_from is not None:
        check_recorded_base(run_dir, base, str(checkpoint))
    budget = parse_duration(cfg.train.time_budget, "train.time_budget") if cfg.train.time_budget else None
    return resolve(stage.train)(cfg, base, run_dir, resume_from=resume_from, time_budget_s=budget)


__all__ = ["DPO", "GRPO", "REWARD", "SFT", "STAGES", "Stage", "check_recorded_base", "policy_base", "resolve",
           "run_stage", "stage_args", "stage_command", "train_grpo", "train_sft"]
