"""The sandbox for generated code: hostile programs end as timeout/failed/error, the grader and the
machine's other processes and files stay untouched."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lmforge.eval import sandbox
from lmforge.eval.sandbox import Isolation, Limits, execute, execute_many

ISO = sandbox.isolation()
BAD = {"timeout", "failed", "error"}


@pytest.fixture
def bystander():
    """A process of the grader's user that no sandboxed program may touch."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    assert proc.poll() is None, "a sandboxed program killed another process of the machine"
    proc.kill()
    proc.wait()


@pytest.fixture
def shared_dir():
    """A directory every user may write, for markers that escaped processes would leave."""
    path = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-test-"))
    path.chmod(0o777)
    yield path
    for f in path.iterdir():
        f.unlink()
    path.rmdir()


def sandbox_pids() -> list[int]:
    """Processes running as a sandbox user id (there must be none once a run is over)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            uid = entry.stat().st_uid if entry.name.isdigit() else None
        except OSError:
            continue
        if uid is not None and sandbox.UID_BASE <= uid < sandbox.UID_BASE + sandbox.UID_SPAN:
            pids.append(int(entry.name))
    return pids


def test_passing_failing_and_syntax_error_programs():
    ok = execute("print(sum(range(10)))", timeout=5)
    assert (ok.status, ok.returncode, ok.stdout) == ("passed", 0, "45\n")
    bad = execute("assert 1 + 1 == 3, 'arithmetic'", timeout=5)
    assert bad.status == "failed" and "AssertionError: arithmetic" in bad.stderr
    assert execute("import sys; sys.exit(3)", timeout=5).returncode == 3
    broken = execute("def f(:\n    pass", timeout=5)
    assert broken.status == "error" and "SyntaxError" in broken.stderr


def test_infinite_loop_times_out(bystander):
    result = execute("while True:\n    pass", timeout=1)
    assert result.status == "timeout"
    assert sandbox_pids() == []


def test_standard_input_is_closed_and_directory_is_fresh_and_removed():
    program = "import os, sys\nprint(os.getcwd())\nprint(os.listdir('.'))\nprint(repr(sys.stdin.read()))"
    result = execute(program, timeout=5)
    cwd, listing, stdin = result.stdout.splitlines()
    assert (result.status, listing, stdin) == ("passed", "[]", "''")
    assert not Path(cwd).exists()


def test_allocating_10_gb_fails(bystander):
    result = execute("x = bytearray(10 * 10**9)\nprint(len(x))", timeout=5)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_writing_a_1_gb_file_fails():
    program = ("with open('big', 'wb') as f:\n"
               "    for _ in range(1024):\n"
               "        f.write(b'x' * (1 << 20))\n")
    result = execute(program, timeout=5)
    assert result.status == "failed" and "File too large" in result.stderr


def test_printing_100_mb_is_cut_off_without_buffering_it():
    limits = Limits(max_output=1 << 16)
    result = execute("import sys\nfor _ in range(100):\n    sys.stdout.write('x' * (1 << 20))",
                     timeout=10, limits=limits)
    assert result.status == "failed" and "output" in result.reason
    assert len(result.stdout) == limits.max_output


def test_grader_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("LMFORGE_TEST_SECRET", "hunter2-secret")
    result = execute("import os\nprint(dict(os.environ))\nprint(os.environ['LMFORGE_TEST_SECRET'])",
                     timeout=5)
    assert result.status == "failed" and "KeyError" in result.stderr
    assert "hunter2-secret" not in result.stdout
    via_proc = execute(f"print(open('/proc/{os.getpid()}/environ', 'rb').read())", timeout=5)
    assert via_proc.status == "failed" and "hunter2-secret" not in via_proc.stdout


@pytest.mark.skipif(not ISO.user, reason="the grader is not root: the program runs as the grader's "
                    "own user and could write the grader's files")
def test_writing_outside_its_directory_fails(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("original")
    program = (f"open({str(victim)!r}, 'w').write('overwritten')\n")
    result = execute(program, timeout=5)
    assert result.status == "failed" and "PermissionError" in result.stderr
    removal = execute(f"import os\nos.remove({str(victim)!r})", timeout=5)
    assert removal.status == "failed"
    assert victim.read_text() == "original"


def test_socket_to_a_local_server_does_not_connect():
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    try:
        program = (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                   "s.sendall(b'leak')")
        result = execute(program, timeout=5)
        assert result.status == "failed"
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


def test_killing_its_parent_or_the_grader_fails(bystander):
    for target in ("os.getppid()", str(os.getpid()), "-1"):
        result = execute(f"import os, signal\nos.kill({target}, signal.SIGKILL)\n"
                         "import time\ntime.sleep(5)", timeout=2)
        assert result.status in BAD, target
    assert sandbox_pids() == []


def escape_program(marker: Path, parent: str) -> str:
    """A child leaves the process group with setsid(), sleeps, then writes `marker`."""
    return (f"import os, time\n"
            f"if os.fork() == 0:\n"
            f"    os.setsid()\n"
            f"    time.sleep(1.0)\n"
            f"    open({str(marker)!r}, 'w').write('escaped')\n"
            f"    os._exit(0)\n"
            f"{parent}\n")


def test_setsid_escape_is_killed(shared_dir):
    # Control: left alone, the child does write the marker (so its absence below means something).
    control = shared_dir / "control"
    waited = execute(escape_program(control, "os.wait()"), timeout=10)
    assert waited.status == "passed" and control.read_text() == "escaped"
    # The parent times out / exits at once: the escaped child must die with the run.
    timed_out = execute(escape_program(shared_dir / "after-timeout", "time.sleep(60)"), timeout=0.5)
    assert timed_out.status == "timeout"
    exited = execute(escape_program(shared_dir / "after-exit", "pass"), timeout=5)
    assert exited.status == "passed"
    time.sleep(1.5)
    assert sorted(p.name for p in shared_dir.iterdir()) == ["control"]
    assert sandbox_pids() == []


def forks_made(processes: int) -> int:
    """How many of 100 fork attempts succeed under `processes` (harmless even without a limit)."""
    program = ("import os, time\n"
               "made = 0\n"
               "for _ in range(100):\n"
               "    try:\n"
               "        if os.fork() == 0:\n"
               "            time.sleep(30)\n"
               "            os._exit(0)\n"
               "        made += 1\n"
               "    except OSError:\n"
               "        break\n"
               "print(made)\n")
    result = execute(program, timeout=5, limits=Limits(processes=processes))
    assert result.status == "passed", result.stderr
    return int(result.stdout)


@pytest.mark.skipif(not ISO.process_limit, reason="no effective process-count limit here")
def test_process_limit_bounds_the_number_of_processes():
    assert 0 < forks_made(16) < 16
    assert sandbox_pids() == []


@pytest.mark.skipif(not ISO.process_limit, reason="no effective process-count limit here (the "
                    "grader is not root, so the program cannot get a user id of its own and "
                    "RLIMIT_NPROC would count the grader's processes): a fork bomb would be unbounded")
def test_fork_bomb_is_bounded_and_cleaned_up(bystander):
    if forks_made(16) >= 16:  # measured, not assumed: never start an unbounded fork bomb
        pytest.skip("RLIMIT_NPROC is not enforced for the sandbox user on this machine")
    program = ("import os, time\n"
               "while True:\n"
               "    try:\n"
               "        os.fork()\n"
               "    except OSError:\n"
               "        time.sleep(0.05)\n")
    result = execute(program, timeout=2, limits=Limits(processes=16))
    assert result.status in BAD
    assert sandbox_pids() == []


def test_execute_many_keeps_order_and_isolates_runs():
    programs = ["print(1)", "raise SystemExit(2)", "while True: pass", "print(4)", "x = (", "print(6)"]
    results = execute_many(programs, timeout=1.5, workers=3)
    assert [r.status for r in results] == ["passed", "failed", "timeout", "passed", "error", "passed"]
    assert [r.stdout for r in results if r.passed] == ["1\n", "4\n", "6\n"]


def test_result_reports_isolation():
    result = execute("pass", timeout=5)
    assert result.isolation == ISO
    assert ISO.network in {"namespace", "sockets blocked in-process"}


@pytest.fixture
def without_namespaces(monkeypatch):
    """The sandbox as on a machine without `unshare`: sockets blocked in-process, no PID namespace."""
    prefix, iso, keep_read = sandbox._setup()
    fallback = Isolation("sockets blocked in-process", pid_namespace=False, user=iso.user,
                         process_limit=iso.process_limit)
    monkeypatch.setattr(sandbox, "_setup", lambda: ([], fallback, keep_read))
    return fallback


def test_fallback_blocks_sockets_in_process(without_namespaces):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    try:
        port = server.getsockname()[1]
        for connect in (f"socket.create_connection(('127.0.0.1', {port}))",
                        f"socket.socket().connect(('127.0.0.1', {port}))"):
            result = execute(f"import socket\n{connect}", timeout=5)
            assert result.status == "failed" and "network access is disabled" in result.stderr
            assert result.isolation.network == "sockets blocked in-process"
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()


@pytest.mark.skipif(not ISO.user, reason="the grader is not root: no user id of its own to reap by")
def test_fallback_reaps_setsid_escapers_by_user_id(without_namespaces, shared_dir):
    control = shared_dir / "control"
    assert execute(escape_program(control, "os.wait()"), timeout=10).status == "passed"
    assert control.exists()
    exited = execute(escape_program(shared_dir / "after-exit", "pass"), timeout=5)
    assert exited.status == "passed"
    time.sleep(1.5)
    assert sorted(p.name for p in shared_dir.iterdir()) == ["control"]
    assert sandbox_pids() == []


@pytest.mark.slow
def test_runner_ends_the_run_by_itself_when_the_grader_dies(shared_dir, tmp_path):
    def writer(delay: float, name: str) -> str:
        return f"import time\ntime.sleep({delay})\nopen({str(shared_dir / name)!r}, 'w').write('x')"

    # Timeout 1 s: the runner's own alarm fires at 3 s. The early marker (written at 1 s, after the
    # grader is gone) shows the orphaned run is alive; the late one (at 4 s) must never appear.
    grader = ("import os, threading, time\n"
              "from lmforge.eval.sandbox import execute\n"
              f"for program in ({writer(1, 'early')!r}, {writer(4, 'late')!r}):\n"
              "    threading.Thread(target=execute, args=(program, 1.0), daemon=True).start()\n"
              "time.sleep(0.5)\n"
              "os._exit(0)  # dies without cleaning up its sandboxes\n")
    # The dead grader cannot remove its run directories: keep them under tmp_path.
    subprocess.run([sys.executable, "-c", grader], check=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    time.sleep(5)
    assert sorted(p.name for p in shared_dir.iterdir()) == ["early"]
    assert sandbox_pids() == []


def test_output_up_to_the_bound_is_kept_whole():
    limits = Limits(max_output=1000)
    exact = execute("import sys\nsys.stdout.write('y' * 1000)", timeout=5, limits=limits)
    assert (exact.status, exact.stdout) == ("passed", "y" * 1000)
    over = execute("import sys\nsys.stdout.write('y' * 1001)", timeout=5, limits=limits)
    assert over.status == "failed" and over.stdout == "y" * 1000


def test_signals_end_as_failed_and_the_cpu_limit_as_timeout():
    crash = execute("import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)", timeout=5)
    assert (crash.status, crash.reason) == ("failed", "killed by SIGSEGV")
    # RLIMIT_CPU delivers SIGXCPU; sent by hand here so the test does not depend on CPU speed.
    cpu = execute("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)", timeout=5)
    assert (cpu.status, cpu.reason) == ("timeout", "CPU time limit")
