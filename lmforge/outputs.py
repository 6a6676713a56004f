"""The one rule for where a command writes: never overwrite what the command did not make.

A command whose `--out` already holds something refuses with one line unless `--force` is given;
an empty directory is fine. With `--force` the command replaces its own outputs at that path.
Commands that continue their own earlier work in `--out` (`pretrain`, `run`, `data prepare` on a
directory it wrote) take a run lock there instead (lmforge.runlock).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable
from pathlib import Path

from lmforge.errors import UserError
from lmforge.runlock import LOCK_NAME

FORCE_HELP = "replace what is already at --out (default: refuse to overwrite anything)"


def add_force_arg(parser: argparse.ArgumentParser) -> None:
    """The one `--force` flag of every command that writes an output path."""
    parser.add_argument("--force", action="store_true", help=FORCE_HELP)


def check_output(out: str | os.PathLike, force: bool, *, directory: bool = True,
                 writes: Iterable[str] | None = None, flag: str = "--out") -> Path:
    """Refuse an output that would overwrite something, before any work is done.

    `directory`: the output is a directory (else one file). `writes`: the names the command writes
    into an existing directory; only those may clash (default: any content of the directory does).
    A file where a directory belongs (or the reverse) is refused even with `force`.
    """
    out = Path(out)
    if directory and out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is a file; give a directory to write into")
    if not directory and out.is_dir():
        raise UserError(f"{flag} {out} is a directory; give the path of the file to write")
    if force or not out.exists():
        return out
    if not directory:
        clash: Path | None = out
    elif writes is not None:
        clash = next((out / name for name in writes if (out / name).exists()), None)
    else:
        # A lock alone is another writer at work: run_lock names it rather than "already exists".
        clash = out if any(p.name != LOCK_NAME for p in out.iterdir()) else None
    if clash is not None:
        raise UserError(f"{clash} already exists; choose another {flag} or pass --force to replace it")
    return out
