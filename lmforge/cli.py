"""The one command line: `lmforge <command> ...`.

`COMMANDS` below is the whole table of commands. Each row names the function that runs it and the
function that declares its arguments, both as "module:function" strings, so `lmforge --help` and a
command's own `--help` import only what they need (torch is not imported to print a config).

Every handler takes the parsed `argparse.Namespace` and returns an exit code (or None for 0).
A `UserError` raised anywhere becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
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
    Command("import hf", "lmforge.interop.hf:import_command", "lmforge.interop.hf:import_args",
            "Import a Hugging Face Llama/Qwen3 model directory as an lmforge checkpoint."),
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


def config_from_args(args: argparse.Namespace, base: dict | None = None):
    """Resolve the RunConfig described by --preset / --config / --set."""
    from lmforge.config import load_config

    return load_config(
        preset=getattr(args, "preset", None),
        config_file=getattr(args, "config", None),
        overrides=getattr(args, "overrides", None),
        base=base,
    )


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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `lmforge tokenizer encode | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
