"""`lmforge checkpoint consolidate`: a sharded (DCP) checkpoint -> one model.safetensors."""

from __future__ import annotations

import argparse
from pathlib import Path


def consolidate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sharded_dir", metavar="SHARDED_DIR",
                        help="a directory written by lmforge.distributed.checkpoint.save_sharded")
    parser.add_argument("--out", required=True, metavar="FILE.safetensors",
                        help="the single weights file to write (checkpoint names, e.g. model.safetensors)")


def consolidate_command(args: argparse.Namespace) -> int:
    from lmforge.distributed.checkpoint import consolidate

    out = consolidate(Path(args.sharded_dir), Path(args.out))
    print(f"wrote {out}")
    return 0
