"""`lmforge dpo`, `lmforge reward train`, `lmforge grpo` and `lmforge reward score`.

The training commands are rows of the fine-tuning stages' table (lmforge/finetune/stages.py),
which holds their one flow (a policy checkpoint in, the stage's defaults, a run directory out,
`--resume`, `--time-budget`) beside `lmforge sft`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.finetune.stages import DPO, GRPO, REWARD, stage_args, stage_command

POLICY_HELP = ("the policy to start from: a checkpoint directory, or a run directory (its newest "
               "complete checkpoint); its tokenizer must have the chat tokens")
GRPO_POLICY_HELP = ("the policy to start from (usually an SFT run): a checkpoint directory, or a run "
                    "directory (its newest complete checkpoint)")


def dpo_args(parser: argparse.ArgumentParser) -> None:
    stage_args(parser, DPO, POLICY_HELP)


def dpo_command(args: argparse.Namespace) -> int:
    return stage_command(args, DPO)


def reward_train_args(parser: argparse.ArgumentParser) -> None:
    stage_args(parser, REWARD, POLICY_HELP)


def reward_train_command(args: argparse.Namespace) -> int:
    return stage_command(args, REWARD)


def grpo_args(parser: argparse.ArgumentParser) -> None:
    stage_args(parser, GRPO, GRPO_POLICY_HELP)


def grpo_command(args: argparse.Namespace) -> int:
    return stage_command(args, GRPO)


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


__all__ = ["dpo_args", "dpo_command", "grpo_args", "grpo_command", "reward_score_args", "reward_score_command",
           "reward_train_args", "reward_train_command"]

