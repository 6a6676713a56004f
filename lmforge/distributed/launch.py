"""`lmforge pretrain --nproc N`: re-run the same command under torchrun on this machine.

It is shorthand for

    torchrun --standalone --nproc_per_node=N -m lmforge pretrain ...   (the other arguments as given)

`--standalone` starts a private rendezvous on a free local port, so several jobs on one machine do
not collide. For several machines, call torchrun directly (docs/distributed.md).
"""

from __future__ import annotations

import os
import sys

from lmforge.errors import UserError


def strip_nproc(argv: list[str]) -> list[str]:
    """argv without `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line running `lmforge <argv>` on `nproc` local processes."""
    if nproc < 1:
        raise UserError(f"--nproc={nproc} must be >= 1")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "lmforge", *strip_nproc(argv)]


def exec_torchrun(nproc: int, argv: list[str] | None = None) -> None:
    """Replace this process by torchrun running the same lmforge command on `nproc` processes."""
    if "RANK" in os.environ:
        raise UserError("--nproc is for starting a job; this process already runs under torchrun")
    cmd = torchrun_command(nproc, sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)
