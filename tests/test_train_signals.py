"""Interrupted runs exit non-zero: SIGINT -> 130, SIGTERM -> 143 (128 + the signal, what a shell
reports for a process the signal ended), after saving a complete checkpoint that `--resume`
continues from; a second signal stops at once and never leaves half a checkpoint. Real
subprocesses for the exit codes of `lmforge pretrain` and `lmforge run`; the second signal is sent
in-process at a chosen moment (mid-step, mid-checkpoint-write) so the test is deterministic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_objectives import _loop
from train_fixtures import make_shards, read_metrics, set_args

from lmforge.errors import Interrupted
from lmforge.train import checkpoint as checkpoint_module
from lmforge.train.checkpoint import CheckpointManager

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"), n_docs=60)


def _pretrain(shards: Path, out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lmforge", "pretrain", "--data", str(shards), "--out",
                             str(out), *set_args(*overrides)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_a_step(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        path = run / "metrics.jsonl"
        if path.is_file() and any('"loss"' in line for line in path.read_text().splitlines()):
            return
        time.sleep(0.02)
    process.kill()
    raise AssertionError(f"no training step within {timeout}s: {process.communicate()}")


def _no_partial_checkpoints(run: Path) -> None:
    root = run / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers
    assert all((p / "COMPLETE").is_file() for p in root.iterdir())


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_pretrain_exits_128_plus_the_signal_after_checkpointing(shards, tmp_path, sig, code):
    run = tmp_path / "run"
    process = _pretrain(shards, run, "train.max_steps=100000", "train.log_every=1",
                        "train.checkpoint_every=100000", "train.eval_every=100000")
    _wait_for_a_step(run, process)
    process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    assert process.returncode == code, out + err
    assert "Traceback" not in err and "resume with --resume" in err
    _no_partial_checkpoints(run)
    latest = CheckpointManager(run, 3).latest()
    stopped = max(r["step"] for r in read_metrics(run) if "loss" in r)
    assert latest is not None and latest.name == f"step_{stopped:08d}"  # the stop saved its step
    resumed = subprocess.run([sys.executable, "-m", "lmforge", "pretrain", "--data", str(shards), "--out",
                              str(run), "--resume", *set_args(f"train.max_steps={stopped + 2}")],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"step {stopped + 2}/{stopped + 2}" in resumed.stdout


def test_an_injected_sigterm_also_exits_143(shards, tmp_path):
    """debug.inject=sigterm@N: the process signals itself, so the code is checked without timing."""
    process = _pretrain(shards, tmp_path / "run", "debug.inject=sigterm@3")
    out, err = process.communicate(timeout=120)
    assert process.returncode == 143, out + err
    assert CheckpointManager(tmp_path / "run", 3).latest().name == "step_00000003"


@pytest.mark.slow
def test_lmforge_run_exits_143_on_sigterm_in_pretraining(tmp_path):
    from test_pipeline import make_corpus, records, run_command

    corpus = make_corpus(tmp_path)
    done = subprocess.run(run_command(tmp_path / "run", corpus, "debug.inject=sigterm@12"),
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 143, done.stdout + done.stderr
    assert "run the same command again" in done.stderr and "Traceback" not in done.stderr
    assert records(tmp_path / "run")["pretrain"]["status"] == "running"


class _SignalTwice:
    """Wraps an objective's next_batch: at batch `at`, SIGINT; at the next one, SIGINT again."""

    def __init__(self, objective, at: int) -> None:
        self.next_batch, self.at, self.count = objective.next_batch, at, 0

    def __call__(self):
        self.count += 1
        if self.count in (self.at, self.at + 1):
            os.kill(os.getpid(), signal.SIGINT)
        return self.next_batch()


def test_a_second_signal_mid_step_stops_at_once(tmp_path):
    loop = _loop(tmp_path / "run")
    loop.objective.accum = 2  # micro-batches 7 and 8 are step 4's
    loop.objective.next_batch = _SignalTwice(loop.objective, at=7)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stopped:
        loop.run()
    assert stopped.value.signum == signal.SIGINT and not stopped.value.saved
    assert stopped.value.exit_code == 130
    assert loop.step == 3  # step 4 was never applied
    assert signal.getsignal(signal.SIGINT) is handler  # the run's handlers are gone
    _no_partial_checkpoints(tmp_path / "run")


def test_a_second_signal_mid_checkpoint_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """The signal lands after the weights are written and before COMPLETE: the temporary directory
    is removed, the step's checkpoint never appears, the previous one is intact."""
    loop = _loop(tmp_path / "run")
    real = checkpoint_module.write_checkpoint

    def interrupted_write(directory: Path, **contents):
        real(directory, **contents)
        if contents["trainer_state"]["step"] == 4:
            (directory / "COMPLETE").unlink()
            raise Interrupted(signal.SIGINT, saved=False)

    monkeypatch.setattr(checkpoint_module, "write_checkpoint", interrupted_write)
    with pytest.raises(Interrupted):
        loop.run()
    _no_partial_checkpoints(tmp_path / "run")
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step_00000000"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000000" / "trainer_state.json").read_text())
    assert state["step"] == 0
    monkeypatch.undo()  # the kept checkpoint is what a resume reads
    resumed = _loop(tmp_path / "run", resume_from=tmp_path / "run" / "checkpoints" / "step_00000000").run()
    assert resumed.step == 8
