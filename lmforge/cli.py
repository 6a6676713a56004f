"""The one command line: `lmforge <command> ...`.

`COMMANDS` below is the whole table of commands. Each row names the function that runs it and the
function that declares its arguments, both as "module:function" strings, so `lmforge --help` and a
command's own `--help` import only what they need (torch is not imported to print a config).

Every handler takes the parsed `argparse.Namespace` and returns an exit code (or None for 0).
A `UserError` raised anywhere becomes one line on stderr and exit code 2, and so do the expected
failures of `expected_failure` (out of disk space, an output path that is a file or not writable,
an allocation beyond memory); anything else is a bug and keeps its traceback
(LMFORGE_TRACEBACK=1 shows it for those too).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from lmforge.errors import UserError


@dataclass(frozen=True)
class Command:
    name: str  # words typed after `lmforge`, e.g. "tokenizer train"
    run: str  # "module:function" taking the parsed args
    arguments: str  # "module:function" adding arguments to an argparse parser
    help: str


COMMANDS: list[Command] = [
    Command("config show", "lmforge.commands:config_show", "lmforge.commands:config_show_args",
            "Print the resolved run config as TOML."),
    Command("init", "lmforge.commands:init", "lmforge.commands:init_args",
            "Write a randomly initialised checkpoint (model.safetensors + config.json)."),
    Command("model info", "lmforge.commands:model_info", "lmforge.commands:model_info_args",
            "Parameters by group, FLOPs per token and memory for a preset or checkpoint."),
    Command("export hf", "lmforge.interop.hf:export_command", "lmforge.interop.hf:export_args",
            "Export a checkpoint as a Hugging Face Llama/Qwen3 model directory."),
    Command("export peft", "lmforge.interop.peft:export_command", "lmforge.interop.peft:export_args",
            "Export a LoRA checkpoint's adapters as a peft adapter directory."),
    Command("export gguf", "lmforge.interop.gguf:export_command", "lmforge.interop.gguf:export_args",
            "Export a checkpoint and its tokenizer as one GGUF file for llama.cpp."),
    Command("import hf", "lmforge.interop.hf:import_command", "lmforge.interop.hf:import_args",
            "Import a Hugging Face Llama/Qwen3 model directory as an lmforge checkpoint."),
    Command("tokenizer train", "lmforge.tokenizer.cli:train", "lmforge.tokenizer.cli:train_args",
            "Train a byte-level BPE tokenizer on text files, directories, globs or JSONL."),
    Command("tokenizer encode", "lmforge.tokenizer.cli:encode", "lmforge.tokenizer.cli:encode_args",
            "Encode text on stdin to token ids."),
    Command("tokenizer decode", "lmforge.tokenizer.cli:decode", "lmforge.tokenizer.cli:decode_args",
            "Decode token ids on stdin to text."),
    Command("tokenizer stats", "lmforge.tokenizer.cli:stats", "lmforge.tokenizer.cli:stats_args",
            "Bytes per token, share of the vocabulary used and longest tokens on some text."),
    Command("tokenizer export", "lmforge.tokenizer.cli:export", "lmforge.tokenizer.cli:export_args",
            "Export a tokenizer as a Hugging Face tokenizer.json or a tiktoken rank file."),
    Command("data prepare", "lmforge.data.cli:prepare", "lmforge.data.cli:prepare_args",
            "Curate sources (clean, filter, dedup, decontaminate) and write token shards."),
    Command("data inspect", "lmforge.data.cli:inspect", "lmforge.data.cli:inspect_args",
            "Summarise a shards directory, verify its shards and print decoded samples."),
    Command("checkpoint consolidate", "lmforge.distributed.cli:consolidate_command",
            "lmforge.distributed.cli:consolidate_args",
            "Join a sharded (FSDP / DCP) checkpoint into one model.safetensors."),
    Command("pretrain", "lmforge.train.cli:pretrain_command", "lmforge.train.cli:pretrain_args",
            "Pre-train a model on token shards (resumable, with checkpoints and a spike guard)."),
    Command("sft", "lmforge.finetune.cli:sft_command", "lmforge.finetune.cli:sft_args",
            "Fine-tune a checkpoint on conversations, fully or with LoRA (resumable)."),
    Command("grpo", "lmforge.align.commands:grpo_command", "lmforge.align.commands:grpo_args",
            "RL with verifiable rewards (GRPO) from a chat checkpoint on built-in tasks (resumable)."),
    Command("dpo", "lmforge.align.commands:dpo_command", "lmforge.align.commands:dpo_args",
            "Align a chat checkpoint on preference pairs with DPO (or IPO), resumable."),
    Command("reward train", "lmforge.align.commands:reward_train_command",
            "lmforge.align.commands:reward_train_args",
            "Train a reward model (a scalar head) on preference pairs, Bradley-Terry loss."),
    Command("reward score", "lmforge.align.commands:reward_score_command",
            "lmforge.align.commands:reward_score_args",
            "Score answers (or chosen/rejected pairs) with a reward model."),
    Command("lora merge", "lmforge.finetune.lora:merge_command", "lmforge.finetune.lora:merge_args",
            "Merge a LoRA checkpoint's adapters into its base: a plain checkpoint."),
    Command("plan", "lmforge.plan:plan_command", "lmforge.plan:plan_args",
            "Parameters, FLOPs, memory and time to train a model on Chinchilla-style token counts."),
    Command("sample", "lmforge.train.cli:sample_command", "lmforge.train.cli:sample_args",
            "Stream a continuation of a prompt from a checkpoint."),
    Command("chat", "lmforge.chat.terminal:chat_command", "lmforge.chat.terminal:chat_args",
            "Chat with a checkpoint in the terminal (or answer one --prompt)."),
    Command("serve", "lmforge.serve:serve_command", "lmforge.serve:serve_args",
            "Serve a checkpoint over an OpenAI-compatible HTTP API (chat and completions)."),
    Command("run", "lmforge.pipeline.cli:run_command", "lmforge.pipeline.cli:run_args",
            "Raw text to a chat model in one go: data, tokenizer, pre-training, SFT, alignment, eval, export, report."),
    Command("eval", "lmforge.eval.cli:eval_command", "lmforge.eval.cli:eval_args",
            "Score a checkpoint on benchmarks (MMLU, ARC, HellaSwag, GSM8K, HumanEval, ...) and bits per byte."),
    Command("report", "lmforge.report.cli:report_command", "lmforge.report.cli:report_args",
            "Regenerate a run's report (Markdown, HTML, PDF) from its artefacts."),
    Command("guide", "lmforge.report.guide:guide_command", "lmforge.report.guide:guide_args",
            "Build the guide (docs/guide/, one chapter per stage) into one PDF."),
]


def add_config_args(parser: argparse.ArgumentParser, preset_required: bool = False) -> None:
    """The three config layers every config-taking command accepts."""
    from lmforge.config import preset_names

    group = parser.add_argument_group("configuration")
    group.add_argument("--preset", required=preset_required, metavar="NAME",
                       help=f"start from a named preset: {', '.join(preset_names())}")
    group.add_argument("--config", metavar="FILE.toml", help="a TOML file of overrides")
    group.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="SECTION.FIELD=VALUE",
                       help="override one field (repeatable), e.g. --set model.n_layers=8")


def add_run_args(parser: argparse.ArgumentParser, out_help: str,
                 time_budget_help: str = "finish within this wall-clock time, e.g. 5m (sets "
                                         "train.time_budget)") -> None:
    """--out, the config layers, --resume and --time-budget: every command that trains into a run
    directory (pretrain, sft, dpo, reward train, grpo) takes them alike."""
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help=out_help)
    add_config_args(parser)
    parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                        help="continue from RUN_DIR's newest complete checkpoint, or from CKPT")
    parser.add_argument("--time-budget", metavar="DURATION", help=time_budget_help)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (0 or less is refused, never replaced by a default)."""
    return _int_at_least(text, 1)


def nonnegative_int(text: str) -> int:
    """An argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
    return value


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan and inf are refused)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def config_from_args(args: argparse.Namespace, base: dict | None = None):
    """Resolve the RunConfig described by --preset / --config / --set."""
    from lmforge.config import load_config

    return load_config(
        preset=getattr(args, "preset", None),
        config_file=getattr(args, "config", None),
        overrides=getattr(args, "overrides", None),
        base=base,
    )


# OS errors that are about the user's paths or machine, not about lmforge's code.
_PATH_ERRNOS = {
    errno.EEXIST: "already exists",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a part of this path is not a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOENT: "no such file or directory",
    errno.ELOOP: "too many levels of symbolic links",
}
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_ALLOCATION_FAILURES = ("can't allocate memory", "not enough memory", "out of memory")


def expected_failure(e: BaseException) -> str | None:
    """One line for a failure that is the machine's or the user's paths', not a bug; else None.

    Out of disk space, an output path that is a file or not writable, memory that cannot be
    allocated: these are told in one line (exit 2). Anything else keeps its traceback.
    """
    if isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS:
        where = f" writing {e.filename}" if e.filename else ""
        return (f"out of disk space{where} ({os.strerror(e.errno)}); nothing half-written was "
                "left behind: free some space and rerun")
    if isinstance(e, OSError) and e.errno in _PATH_ERRNOS and e.filename:
        other = f" -> {e.filename2}" if e.filename2 else ""
        return f"{e.filename}{other}: {_PATH_ERRNOS[e.errno]}"
    text = str(e)
    if isinstance(e, MemoryError) or (
            isinstance(e, RuntimeError) and any(s in text.lower() for s in _ALLOCATION_FAILURES)):
        detail = text.strip().splitlines()[-1][:200] if text.strip() else type(e).__name__
        return f"out of memory: {detail} (use a smaller model, batch or sequence)"
    return None


def _resolve(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _match(argv: list[str]) -> tuple[Command | None, int]:
    """Find the command whose words start argv; longest match wins."""
    best, used = None, 0
    for cmd in COMMANDS:
        words = cmd.name.split()
        if argv[: len(words)] == words and len(words) > used:
            best, used = cmd, len(words)
    return best, used


def _overview() -> str:
    width = max(len(c.name) for c in COMMANDS)
    rows = "\n".join(f"  {c.name.ljust(width)}  {c.help}" for c in COMMANDS)
    return (
        "usage: lmforge <command> [options]\n\n"
        "Build a language model from scratch: data, tokenizer, pre-training, evaluation.\n\n"
        f"commands:\n{rows}\n\n"
        "Run `lmforge <command> --help` for a command's options."
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0
    if argv[0] == "--version":
        from lmforge import __version__

        print(f"lmforge {__version__}")
        return 0
    cmd, used = _match(argv)
    if cmd is None:
        # A group name alone (e.g. `lmforge tokenizer`) lists that group's commands.
        group = [c for c in COMMANDS if c.name.split()[0] == argv[0]]
        if group and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print("\n".join(f"lmforge {c.name:<20} {c.help}" for c in group))
            return 0
        print(f"error: unknown command {' '.join(argv[:2])!r}\n", file=sys.stderr)
        print(_overview(), file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog=f"lmforge {cmd.name}", description=cmd.help)
    _resolve(cmd.arguments)(parser)
    args = parser.parse_args(argv[used:])
    try:
        code = _resolve(cmd.run)(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # Interrupted (a run stopped by a signal) carries its code
        print(f"interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # e.g. `lmforge tokenizer encode | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as e:  # last: an expected failure of the machine or a path is one line too
        line = expected_failure(e)
        if line is None or os.environ.get("LMFORGE_TRACEBACK"):
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
