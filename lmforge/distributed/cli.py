"""`lmforge checkpoint consolidate`: a sharded (DCP) checkpoint -> one model.safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.outputs import add_force_arg, check_output


def consolidate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sharded_dir", metavar="SHARDED_DIR",
                        help="a directory written by lmforge.distributed.checkpoint.save_sharded")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors",
                        help="the single weights file to write (checkpoint names, e.g. model.safetensors)")
    add_force_arg(parser)


def consolidate_command(args: argparse.Namespace) -> int:
    from lmforge.distributed.checkpoint import consolidate

    check_output(args.out, args.force, directory=False)
    out = consolidate(Path(args.sharded_dir), Path(args.out))
    print(f"wrote {out}")
    return 0
