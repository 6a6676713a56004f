"""The process that runs one sandboxed program (started by lmforge/eval/sandbox.py; never imported).

It is run as `python -I sandbox_runner.py SPEC_JSON` (inside fresh PID and network namespaces
where the machine allows), reads the program from standard input and works in two processes:

- the supervisor (PID 1 of the namespace when there is one) forks the program's process, waits
  for it and reports how it ended on the status pipe. A namespace's PID 1 ignores signals without
  a handler, even its own SIGKILL, so the program must never be PID 1; when the supervisor exits,
  the kernel kills every process left in the namespace (escapers that called setsid included).
- the program's process applies the resource limits, drops to an unprivileged user, closes
  standard input, blocks sockets when there is no network namespace, compiles the program and
  runs it as `__main__`.

Status pipe lines: `ready` (limits applied), `compiled`, then `exit N` or `signal N`.
Only the standard library is used: this file runs outside the lmforge package.
"""

import ctypes
import json
import linecache
import os
import resource
import signal
import sys

CAP_DAC_READ_SEARCH = 2
PR_SET_KEEPCAPS = 8
PR_SET_NO_NEW_PRIVS = 38
LINUX_CAPABILITY_VERSION_3 = 0x20080522


def keep_only_read_capability() -> None:
    """Keep CAP_DAC_READ_SEARCH (and nothing else) through the coming setuid.

    The interpreter may live under a directory only root can enter (e.g. /root/.pyenv); the
    capability lets the program read its standard library while it cannot write any file it does
    not own, signal the grader, or exceed RLIMIT_NPROC (which root ignores).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_KEEPCAPS)")


def set_read_capability() -> None:
    """After setuid: make CAP_DAC_READ_SEARCH the only permitted and effective capability."""
    libc = ctypes.CDLL(None, use_errno=True)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    bit = 1 << CAP_DAC_READ_SEARCH
    data = (ctypes.c_uint32 * 6)(bit, bit, 0, 0, 0, 0)  # {effective, permitted, inheritable} x 2
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def block_sockets() -> None:
    """In-process fallback when no network namespace exists: every new socket raises OSError.

    Weak by nature (a program can reach the C library through ctypes); reported as such.
    """
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in the lmforge sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args: object, **kwargs: object) -> None:
            refuse()

    socket.socket = NoSocket  # type: ignore[misc]
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse)


def program_process(source: bytes, spec: dict, status: int) -> None:
    """Limits, privileges, then the program; never returns normally."""
    os.setsid()  # its own session and group, which the supervisor can kill in one call
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    limits = {
        resource.RLIMIT_CPU: (spec["cpu_seconds"], spec["cpu_seconds"] + 1),
        resource.RLIMIT_AS: (spec["memory_bytes"],) * 2,
        resource.RLIMIT_FSIZE: (spec["file_bytes"],) * 2,
        resource.RLIMIT_NOFILE: (spec["open_files"],) * 2,
        resource.RLIMIT_CORE: (0, 0),
    }
    if spec["uid"] is not None:
        limits[resource.RLIMIT_NPROC] = (spec["processes"],) * 2
    for which, value in limits.items():
        resource.setrlimit(which, value)
    os.chdir(spec["workdir"])
    if spec["uid"] is not None:
        if spec["keep_read"]:
            keep_only_read_capability()
        os.setgroups([])
        os.setresgid(spec["uid"], spec["uid"], spec["uid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
        if spec["keep_read"]:
            set_read_capability()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # no setuid binary can give privileges back
    if spec["block_network"]:
        block_sockets()
    os.write(status, b"ready\n")
    code = compile(source, "program.py", "exec")
    text = source.decode("utf-8", errors="replace")  # for tracebacks that show the failing line
    linecache.cache["program.py"] = (len(text), None, text.splitlines(True), "program.py")
    os.write(status, b"compiled\n")
    os.close(status)
    sys.argv = ["program.py"]
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


def stop(pid: int) -> None:
    """Kill the program's session (it called setsid) and end; as a namespace's PID 1 this also
    makes the kernel kill whatever is left in the namespace."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass
    os._exit(128 + signal.SIGKILL)


def main() -> int:
    spec = json.loads(sys.argv[1])
    status = spec["status_fd"]
    source = sys.stdin.buffer.read()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        try:
            program_process(source, spec, status)
        except SystemExit:
            raise
        except BaseException as e:
            import traceback

            tb = e.__traceback__  # show the program's frames, not the runner's
            while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
                tb = tb.tb_next
            traceback.print_exception(type(e), e, tb)
            sys.stderr.flush()
            os._exit(1)
        raise SystemExit(0)  # a normal interpreter exit: buffers flushed, threads joined
    # The grader kills the run at its deadline; this second, later bound holds even if the
    # grader itself died (a sleeping program uses no CPU time, so RLIMIT_CPU would not end it).
    signal.signal(signal.SIGALRM, lambda *_: stop(pid))
    signal.alarm(spec["wall_seconds"])
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        os.write(status, f"signal {os.WTERMSIG(wait_status)}\n".encode())
        return 128 + os.WTERMSIG(wait_status)
    code = os.waitstatus_to_exitcode(wait_status)
    os.write(status, f"exit {code}\n".encode())
    return code


if __name__ == "__main__":
    sys.exit(main())
