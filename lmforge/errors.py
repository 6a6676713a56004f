"""One exception type for mistakes a user can fix.

Every stage raises `UserError` for bad input (a missing file, a malformed line, an invalid config
value). The CLI turns it into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import signal


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration value, e.g. `model.n_heads=6 must divide model.d_model=100`."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM: the CLI exits 128 + the signal's number (130, 143),
    as a shell reports a process the signal ended, so `lmforge pretrain ... && next` stops there.

    `saved`: the run checkpointed before stopping (the first signal); False for a second signal,
    which stops at once. A KeyboardInterrupt, so no `except Exception` swallows it."""

    def __init__(self, signum: int, saved: bool) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"{name}: checkpoint saved" if saved else f"{name} again: stopped at once")
        self.signum, self.saved = signum, saved

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
