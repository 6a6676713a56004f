"""One exception type for mistakes a user can fix.

Every stage raises `UserError` for bad input (a missing file, a malformed line, an invalid config
value). The CLI turns it into one line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, reported as one clear line (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An invalid configuration value, e.g. `model.n_heads=6 must divide model.d_model=100`."""
