"""`python -m lmforge ...` (and `torchrun -m lmforge ...`) runs the CLI."""

import os
import sys

from lmforge.cli import main

if __name__ == "__main__":
    code = main()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # A torchrun worker whose work is done and on disk (checkpoints are atomic, metrics and
        # TensorBoard closed, the process group destroyed) leaves without interpreter teardown:
        # torch.distributed's C++ threads torn down there can abort a rank that finished cleanly
        # ("terminate called without an active exception"), failing the whole job.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
