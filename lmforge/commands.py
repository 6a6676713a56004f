"""Handlers for the foundation commands: `config show`, `init`, `model info`."""

from __future__ import annotations

import argparse

from lmforge.cli import add_config_args, config_from_args


def config_show_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)


def config_show(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_toml(), end="")
    return 0
