"""One writer per run directory: `with run_lock(run_dir, "pretrain"): ...`.

Every command that writes into a run (or output) directory holds `DIR/.lmforge.lock` while it
works. The file names the holder - pid, host, command and since when - for the one line a second
writer gets (exit code 2). Exclusion itself is an advisory `flock` on that file: the kernel drops
it when the holder dies however it dies, so a lock left by a killed process (a dead pid on this
host) is stale by construction and the next writer takes it over, saying so.

The lock is re-entrant within a process (a pipeline stage calling another stage's API does not
lock itself out), and under torchrun only rank 0 takes it: the ranks of one job are one writer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from lmforge.atomic import file_mode
from lmforge.errors import UserError

LOCK_NAME = ".lmforge.lock"

_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process


def _is_main_rank() -> bool:
    # The launcher's RANK, as lmforge.distributed.runtime.ProcessEnv reads it (without importing
    # torch for commands that do not need it).
    return os.environ.get("RANK", "0") == "0"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative numbers would name process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def read_holder(lock: Path) -> dict:
    """What a lock file says about its holder ({} when unreadable or not yet written)."""
    try:
        data = json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (it has not written its name yet)"
    return (f"`lmforge {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, since {holder.get('since', '?')})")


def _try_lock(lock: Path) -> int | None:
    """Open and flock `lock`; the fd when this process now holds the file at that path."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return None
            raise
        # The holder we waited on may have removed the file between our open and flock: then we
        # hold a lock on a name nobody sees; start over on the file now at the path.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold `directory`'s lock for the block (creating the directory, and removing it again if it
    is still empty at the end); a held lock -> UserError."""
    directory = Path(directory)
    if not _is_main_rank():
        yield
        return
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} is a file; give a directory to write into")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / LOCK_NAME).resolve()
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    fd = _try_lock(lock)
    if fd is None:
        raise UserError(f"{directory} is in use by {describe_holder(read_holder(lock))}; wait for "
                        f"it to finish or stop it (one writer per directory)")
    try:
        stale = read_holder(lock)
        if stale:
            host = socket.gethostname()
            pid = stale.get("pid")
            dead = stale.get("host") == host and not (isinstance(pid, int) and _pid_alive(pid))
            note = "no longer running" if dead else "its lock was released"
            print(f"note: taking over the stale lock of {directory} left by "
                  f"{describe_holder(stale)}: {note}", file=sys.stderr)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode("utf-8"), 0)
        _held[lock] = 1
        try:
            yield
        finally:
            del _held[lock]
            # Remove the name first, then release: a writer that opened the old file re-checks
            # the inode after its flock and starts over.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            if created:  # a command that failed before writing leaves no empty --out behind
                with contextlib.suppress(OSError):
                    directory.rmdir()
    finally:
        os.close(fd)
