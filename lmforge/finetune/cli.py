"""`lmforge sft`: fine-tune a checkpoint on conversations (full or LoRA), resumable.

The command is the sft row of the fine-tuning stages' table (lmforge/finetune/stages.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.config import RunConfig
from lmforge.errors import UserError

BASE_HELP = ("base model: a checkpoint directory, or a run directory (its newest complete checkpoint); "
             "its tokenizer must have the chat tokens")


def sft_args(parser: argparse.ArgumentParser) -> None:
    from lmforge.finetune.stages import SFT, stage_args

    stage_args(parser, SFT, BASE_HELP)


def sft_command(args: argparse.Namespace) -> int:
    from lmforge.finetune.stages import SFT, stage_command

    return stage_command(args, SFT)


def keep_base_architecture(cfg: RunConfig, base_cfg: RunConfig, source: Path, command: str = "sft") -> None:
    """Fine-tuning stages (sft, dpo, grpo) train their base's architecture: a model section that
    differs (a --preset, a --set model.*) is refused, naming the first differing field."""
    if cfg.model != base_cfg.model:
        changed = next(k for k, v in cfg.to_dict()["model"].items() if base_cfg.to_dict()["model"][k] != v)
        raise UserError(f"model.{changed}: {command} keeps the model of its base checkpoint {source}; "
                        "drop that setting (or a --preset that sets it)")
