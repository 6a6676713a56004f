"""A sandbox for code written by a model: run it, learn whether it passed, keep the grader safe.

`execute(program)` runs one Python program in a fresh subprocess and returns an
`ExecutionResult` with `status` one of `passed` (exit code 0), `failed` (an exception, a non-zero
exit, a signal, a resource limit hit, too much output), `timeout` (wall-clock or CPU time
exhausted) or `error` (the program does not compile, or the sandbox could not start it), plus the
first `max_output` bytes of its stdout and stderr. `execute_many(programs, workers=N)` runs many
with at most N at a time.

What each run gets (the `Isolation` in every result says which of these this machine allowed):

- A new empty temporary directory as its working directory, removed afterwards.
- Standard input at end of file; an environment holding only a minimal `PATH` (no secrets of the
  grader's environment); the interpreter in isolated mode (`python -I`: no user site, no PYTHON*
  variables, no script directory on `sys.path`).
- Resource limits: CPU time (RLIMIT_CPU, the timeout rounded up), address space (RLIMIT_AS),
  size of any file written (RLIMIT_FSIZE), open files (RLIMIT_NOFILE), no core dumps.
- A wall-clock timeout (counted from the start, interpreter start-up included) after which the
  whole process group, and the PID namespace, is killed.
- Fresh PID, mount and network namespaces (`unshare --pid --net --mount-proc`, the grader must be
  root or allowed user namespaces): the program sees only its own processes, has only a loopback
  interface that is down (so not even 127.0.0.1 is reachable), and when its first process ends the
  kernel kills every process left in the namespace, including ones that called `setsid()` to leave
  the process group. Without namespaces, sockets are blocked in-process (a program using ctypes
  could get around that) and only the process group is killed.
- When the grader runs as root: the program runs as its own unprivileged user id (a fresh one
  per run from a high range no account uses), so it cannot write files it does not own, cannot
  signal the grader or other processes, and RLIMIT_NPROC bounds its processes (root is exempt
  from RLIMIT_NPROC, so this is what stops a fork bomb). If the interpreter lives under a
  directory other users cannot enter (like /root/.pyenv), the program keeps exactly one
  capability, CAP_DAC_READ_SEARCH, so it can import the standard library: it can then *read*
  any file on the machine (it cannot send it anywhere but its own stdout).

Limits, honestly: this is not a security boundary against a determined attacker (no seccomp
filter, the kernel is shared); it can create files in world-writable directories such as /tmp
(each at most `file_bytes`, not counted); without root, the process count is bounded only by the
timeout; memory is bounded per process, so `processes` x `memory_bytes` is the real bound. Should
the grader die, the runner's own alarm still ends the run two seconds after its timeout.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

RUNNER = Path(__file__).with_name("sandbox_runner.py")
NAMESPACES = ["--net", "--pid", "--fork", "--kill-child", "--mount-proc"]
# Sandbox user ids: a fresh one per run so that RLIMIT_NPROC counts only that run's processes.
UID_BASE = 1_500_000_000
UID_SPAN = 500_000_000
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    """Per-run resource limits (the timeout is given to `execute`)."""

    memory_bytes: int = 4 << 30  # address space; 10 GB allocations fail with MemoryError
    file_bytes: int = 16 << 20  # largest file the program may write
    processes: int = 32  # RLIMIT_NPROC for the sandbox user (threads count too)
    open_files: int = 64
    max_output: int = 1 << 20  # bytes kept of stdout and of stderr; more kills the program


@dataclass(frozen=True)
class Isolation:
    """What this machine allowed: reported in every result."""

    network: str  # "namespace" or "sockets blocked in-process"
    pid_namespace: bool  # leftover processes die with the run, setsid escapers included
    user: bool  # runs as an unprivileged user id of its own (grader is root)
    process_limit: bool  # RLIMIT_NPROC is effective (only for a non-root user)


@dataclass(frozen=True)
class ExecutionResult:
    """How one program ended."""

    status: str  # passed | failed | timeout | error
    reason: str  # a short human-readable why, e.g. "exit code 1", "wall-clock timeout 10s"
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    isolation: Isolation

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _unshare_prefix() -> list[str]:
    """The `unshare` command line that works here, or [] when namespaces are unavailable."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return []
    prefix = [unshare, *NAMESPACES] if os.geteuid() == 0 else [unshare, "--map-root-user", *NAMESPACES]
    try:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return prefix if probe.returncode == 0 else []


def _others_can_enter(path: Path) -> bool:
    """Whether a user without privileges can reach files under `path` (o+x on every ancestor)."""
    for folder in [path, *path.parents]:
        try:
            if not os.stat(folder).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


@lru_cache(maxsize=1)
def _setup() -> tuple[list[str], Isolation, bool]:
    """Probe once: the unshare prefix, the isolation it gives, whether to keep the read capability."""
    prefix = _unshare_prefix()
    root = os.geteuid() == 0
    isolation = Isolation(
        network="namespace" if prefix else "sockets blocked in-process",
        pid_namespace=bool(prefix),
        user=root,
        process_limit=root,
    )
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    keep_read = root and not _others_can_enter(stdlib)
    return prefix, isolation, keep_read


def isolation() -> Isolation:
    """The isolation `execute` gives on this machine (probed once per process)."""
    return _setup()[1]


def execute(program: str, timeout: float = 10.0, limits: Limits | None = None) -> ExecutionResult:
    """Run `program` (Python source) in the sandbox; see the module docstring for the guarantees."""
    if not timeout > 0:
        raise ValueError(f"the sandbox timeout must be positive, got {timeout}")
    limits = limits or Limits()
    prefix, iso, keep_read = _setup()
    uid = UID_BASE + secrets.randbelow(UID_SPAN) if iso.user else None
    workdir = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    status_r, status_w = os.pipe()
    start = time.monotonic()
    try:
        if uid is not None:
            os.chown(workdir, uid, uid)
        spec = {
            "workdir": str(workdir), "status_fd": status_w, "uid": uid, "keep_read": keep_read,
            "block_network": not prefix, "cpu_seconds": math.ceil(timeout) + 1,
            "wall_seconds": math.ceil(timeout) + 2,
            "memory_bytes": limits.memory_bytes, "file_bytes": limits.file_bytes,
            "processes": limits.processes, "open_files": limits.open_files,
        }
        cmd = [*prefix, sys.executable, "-I", str(RUNNER), json.dumps(spec)]
        try:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env={"PATH": MINIMAL_PATH}, cwd=workdir, pass_fds=(status_w,),
                start_new_session=True,
            )
        except OSError as e:
            return _result("error", f"cannot start the sandbox: {e}", None, b"", b"", start, iso)
        os.close(status_w)
        status_w = -1
        try:
            assert proc.stdin is not None
            proc.stdin.write(program.encode("utf-8", errors="surrogatepass"))
            proc.stdin.close()
        except BrokenPipeError:
            pass  # the runner died at start; its stderr says why
        out, err, status, ended = _collect(proc, status_r, start + timeout, limits.max_output)
        _kill(proc, uid, iso)
        returncode = proc.wait()
        _await_eof(proc, 5.0)
        if uid is not None:
            _await_user_gone(uid, 5.0)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
        return _classify(ended, returncode, status, out, err, timeout, limits, start, iso)
    finally:
        for fd in (status_r, status_w):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def execute_many(
    programs: Sequence[str], timeout: float = 10.0, workers: int | None = None,
    limits: Limits | None = None,
) -> list[ExecutionResult]:
    """Run every program in its own sandbox, at most `workers` at a time; results in input order."""
    workers = workers or max(1, (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: execute(p, timeout, limits), programs))


def _collect(
    proc: subprocess.Popen, status_fd: int, deadline: float, max_output: int,
) -> tuple[bytes, bytes, str, str]:
    """Read stdout, stderr and the status pipe until the run ends; why it ended.

    Ends with "exited" (all pipes closed or the runner gone), "timeout" or "output" (a stream
    exceeded `max_output`). Output past the bound is never buffered, so printing gigabytes cannot
    exhaust the grader's memory.
    """
    assert proc.stdout is not None and proc.stderr is not None
    streams = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(),
               status_fd: bytearray()}
    with selectors.DefaultSelector() as sel:
        for fd in streams:
            sel.register(fd, selectors.EVENT_READ)
        ended = "exited"
        exited_at: float | None = None
        while sel.get_map():
            now = time.monotonic()
            if now >= deadline:
                ended = "timeout"
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now  # leftover holders of the pipes get a moment, then are killed
            if exited_at is not None and now - exited_at > 0.5:
                break
            for key, _ in sel.select(timeout=min(0.1, deadline - now)):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = streams[key.fd]
                if len(buf) + len(chunk) > max_output and key.fd != status_fd:
                    ended = "output"  # keep what fits, then stop the program
                buf += chunk[: max(0, max_output - len(buf))]
            if ended == "output":
                break
    return (bytes(streams[proc.stdout.fileno()]), bytes(streams[proc.stderr.fileno()]),
            streams[status_fd].decode(errors="replace"), ended)


def _kill(proc: subprocess.Popen, uid: int | None, iso: Isolation) -> None:
    """Kill whatever of the run is left: its process group, and all processes of its user."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # unshare and the runner; the namespace dies with it
    except (ProcessLookupError, PermissionError):
        pass
    kill = shutil.which("kill")
    if uid is not None and not iso.pid_namespace and kill:
        # kill(-1) as the sandbox user reaches every process of that user and nothing else.
        subprocess.run([kill, "-9", "-1"], user=uid, group=uid, extra_groups=[],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def _await_eof(proc: subprocess.Popen, seconds: float) -> None:
    """Wait (bounded) until every process of the run has closed its stdout and stderr.

    The kernel kills a namespace's processes asynchronously after its first process dies; they
    all hold the output pipes, so end of file on both means they are gone (a process that closed
    its own is not waited for).
    """
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        for stream in (proc.stdout, proc.stderr):
            sel.register(stream.fileno(), selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.1):
                if not os.read(key.fd, 1 << 16):
                    sel.unregister(key.fd)


def _await_user_gone(uid: int, seconds: float) -> None:
    """Wait (bounded) until no process of the sandbox user is left, dying ones included."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _user_has_processes(uid):
        time.sleep(0.01)


def _user_has_processes(uid: int) -> bool:
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                return True
        except OSError:
            continue  # exited while we looked
    return False


def _classify(
    ended: str, returncode: int, status: str, out: bytes, err: bytes, timeout: float,
    limits: Limits, start: float, iso: Isolation,
) -> ExecutionResult:
    """The status of a finished run from how it ended and what the runner reported."""
    lines = status.split()
    if ended == "timeout":
        return _result("timeout", f"wall-clock timeout {timeout:g}s", None, out, err, start, iso)
    if ended == "output":
        return _result("failed", f"output over {limits.max_output} bytes", None, out, err, start, iso)
    if "ready" not in lines:
        return _result("error", "the sandbox could not start the program", returncode, out, err,
                       start, iso)
    if "compiled" not in lines:
        return _result("error", "the program does not compile", returncode, out, err, start, iso)
    if "signal" in lines:
        signum = int(lines[lines.index("signal") + 1])
        name = signal.Signals(signum).name if signum in signal.valid_signals() else str(signum)
        state = "timeout" if signum == signal.SIGXCPU else "failed"
        why = "CPU time limit" if state == "timeout" else f"killed by {name}"
        return _result(state, why, -signum, out, err, start, iso)
    if "exit" in lines:
        code = int(lines[lines.index("exit") + 1])
        state = "passed" if code == 0 else "failed"
        return _result(state, f"exit code {code}", code, out, err, start, iso)
    return _result("failed", f"the run ended abnormally (code {returncode})", returncode, out, err,
                   start, iso)


def _result(
    status: str, reason: str, returncode: int | None, out: bytes, err: bytes, start: float,
    iso: Isolation,
) -> ExecutionResult:
    return ExecutionResult(
        status=status, reason=reason, returncode=returncode,
        stdout=out.decode("utf-8", errors="replace"), stderr=err.decode("utf-8", errors="replace"),
        seconds=time.monotonic() - start, isolation=iso,
    )
