"""The conventions of every command that writes (docs/ARCHITECTURE.md, "Writing outputs"):
outputs follow the umask, an existing output is refused without --force (one line, exit 2, the
user's file untouched), and one writer per directory (a run lock naming its holder, taken over when
its holder died)."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.runlock import LOCK_NAME, read_holder, run_lock


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from test_pipeline import make_corpus  # documents that pass the data filters

    return make_corpus(tmp_path_factory.mktemp("text"), docs=60)


@pytest.fixture(scope="module")
def made(tmp_path_factory, corpus) -> dict[str, Path]:
    """Inputs of the commands in the tables: a tokenizer, a checkpoint, its HF export, shards of a
    sharded checkpoint."""
    root = tmp_path_factory.mktemp("made")
    tiny = ["--preset", "tiny", "--set", "model.vocab_size=300", "--set", "model.n_layers=1"]
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "300",
                 "--out", str(root / "tok")]) == 0
    assert main(["init", *tiny, "--out", str(root / "ckpt")]) == 0
    assert main(["export", "hf", "--checkpoint", str(root / "ckpt"), "--out", str(root / "hf")]) == 0

    from lmforge.checkpoint import load_model
    from lmforge.distributed.checkpoint import save_sharded

    save_sharded(root / "sharded", load_model(root / "ckpt"))
    return {"tok": root / "tok", "ckpt": root / "ckpt", "hf": root / "hf",
            "sharded": root / "sharded", "corpus": corpus}


def commands(made: dict[str, Path], out: Path) -> dict[str, tuple[list[str], str]]:
    """Command -> (its argv writing `out`, the name under `out` a user's file clashes with:
    "" when `out` is itself the file)."""
    tiny = ["--preset", "tiny", "--set", "model.vocab_size=300", "--set", "model.n_layers=1"]
    return {
        "init": (["init", *tiny, "--out", str(out)], "mine.txt"),
        "tokenizer train": (["tokenizer", "train", "--input", str(made["corpus"]), "--vocab-size",
                             "300", "--out", str(out)], "mine.txt"),
        "tokenizer export": (["tokenizer", "export", "--format", "hf", "--tokenizer",
                              str(made["tok"]), "--out", str(out)], "tokenizer.json"),
        "checkpoint consolidate": (["checkpoint", "consolidate", str(made["sharded"]),
                                    "--out", str(out)], ""),
        "data prepare": (["data", "prepare", "--source", str(made["corpus"]), "--tokenizer",
                          str(made["tok"]), "--set", "data.workers=1", "--out", str(out)],
                         "tokenizer/mine.txt"),
        "export hf": (["export", "hf", "--checkpoint", str(made["ckpt"]), "--out", str(out)],
                      "mine.txt"),
        "import hf": (["import", "hf", "--from", str(made["hf"]), "--out", str(out)], "mine.txt"),
    }


COMMANDS = ["init", "tokenizer train", "tokenizer export", "checkpoint consolidate",
            "data prepare", "export hf", "import hf"]


@pytest.mark.parametrize("name", COMMANDS)
def test_an_existing_output_is_refused_without_force(name, made, tmp_path, capsys):
    out = tmp_path / "out"
    argv, clash = commands(made, out)[name]
    users = out / clash if clash else out
    users.parent.mkdir(parents=True, exist_ok=True)
    users.write_bytes(b"the user's own work\n")
    stamp = users.stat().st_mtime_ns

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "--force" in err, err
    assert users.read_bytes() == b"the user's own work\n" and users.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # nothing written beside it

    assert main([*argv, "--force"]) == 0, capsys.readouterr().err
    if clash in ("", "tokenizer.json"):  # a file the command writes: replaced, as told
        assert users.read_bytes() != b"the user's own work\n"


@pytest.mark.parametrize("name", ["init", "tokenizer train", "checkpoint consolidate"])
def test_a_file_where_a_directory_belongs_is_one_line_even_with_force(name, made, tmp_path, capsys):
    out = tmp_path / "out"
    argv, clash = commands(made, out)[name]
    if clash:
        out.write_text("a file")
    else:
        out.mkdir()
    capsys.readouterr()
    assert main([*argv, "--force"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(out) in err, err


def test_data_prepare_continues_its_own_output(made, tmp_path, capsys):
    out = tmp_path / "shards"
    argv, _ = commands(made, out)["data prepare"]
    assert main(argv) == 0
    assert main(argv) == 0  # its own directory: continued (curation reused), not refused
    assert "curation reused" in capsys.readouterr().out


def tree_modes(root: Path) -> dict[Path, int]:
    return {p: stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_outputs_follow_the_umask(mask, made, tmp_path):
    from test_report import make_run_dir

    run = make_run_dir(tmp_path)
    old = os.umask(mask)
    try:
        assert main(["init", "--preset", "tiny", "--set", "model.vocab_size=300", "--set",
                     "model.n_layers=1", "--out", str(tmp_path / "ckpt")]) == 0
        assert main(["tokenizer", "train", "--input", str(made["corpus"]), "--vocab-size", "300",
                     "--out", str(tmp_path / "tok")]) == 0
        assert main(["export", "hf", "--checkpoint", str(tmp_path / "ckpt"),
                     "--out", str(tmp_path / "hf")]) == 0
        assert main(["checkpoint", "consolidate", str(made["sharded"]),
                     "--out", str(tmp_path / "one" / "model.safetensors")]) == 0
        assert main(["report", str(run)]) == 0
    finally:
        os.umask(old)
    modes = {}
    for name in ("ckpt", "tok", "hf", "one"):
        modes.update(tree_modes(tmp_path / name))
    modes.update(tree_modes(run / "report"))
    assert tmp_path / "ckpt" / "model.safetensors" in modes
    assert run / "report" / "plots" / "loss.png" in modes
    wrong = {str(path): oct(mode) for path, mode in modes.items()
             if mode != (0o777 if path.is_dir() else 0o666) & ~mask}
    assert not wrong, f"umask {oct(mask)}: {wrong}"


def test_report_keeps_the_users_files_and_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    from test_report import make_run_dir

    from lmforge.report import build_report

    run = make_run_dir(tmp_path)
    (run / "report").mkdir()
    (run / "report" / "thesis.tex").write_text("years of work")
    (run / "report" / "plots").mkdir()
    (run / "report" / "plots" / "mine.png").write_bytes(b"my plot")
    build_report(run)
    assert (run / "report" / "thesis.tex").read_text() == "years of work"
    assert (run / "report" / "plots" / "mine.png").read_bytes() == b"my plot"
    assert (run / "report" / "report.pdf").read_bytes().startswith(b"%PDF")

    # A file an earlier build generated and this one does not goes; the user's stay.
    (run / "report" / "plots" / "old.png").write_bytes(b"generated before")
    listing = run / "report" / ".generated"
    listing.write_text(listing.read_text() + "plots/old.png\n")
    build_report(run)
    assert not (run / "report" / "plots" / "old.png").exists()
    assert (run / "report" / "thesis.tex").is_file() and (run / "report" / "plots" / "mine.png").is_file()
    assert not list(run.glob(".report*")) and not (run / "report" / LOCK_NAME).exists()

    papers = tmp_path / "papers"
    papers.mkdir()
    (papers / "draft.txt").write_text("x")
    capsys.readouterr()
    assert main(["report", str(papers)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run directory" in err
    assert sorted(p.name for p in papers.iterdir()) == ["draft.txt"]


# -- the run lock ------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys
    from lmforge.runlock import run_lock
    with run_lock(sys.argv[1], "pretrain"):
        print("held", flush=True)
        sys.stdin.read()
""")


def hold(directory: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline() == "held\n"
    return process


def test_a_second_writer_gets_one_line_naming_the_holder(tmp_path, corpus):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        for argv in (["tokenizer", "train", "--input", str(corpus), "--out", str(run)],
                     ["run", "--source", str(corpus), "--out", str(run)],
                     ["pretrain", "--data", str(tmp_path / "shards"), "--out", str(run)]):
            second = subprocess.run([sys.executable, "-m", "lmforge", *argv], capture_output=True,
                                    text=True, timeout=120)
            err = second.stderr.strip()
            assert second.returncode == 2, (argv, err)
            assert err.count("\n") == 0 and "in use by `lmforge pretrain`" in err, err
            assert f"pid {holder.pid} on {socket.gethostname()}" in err, err
        assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # nobody else wrote
    finally:
        holder.communicate("")
    assert holder.returncode == 0 and not (run / LOCK_NAME).exists()


def test_a_lock_whose_holder_died_is_taken_over(tmp_path, corpus):
    run = tmp_path / "run"
    holder = hold(run)
    holder.send_signal(signal.SIGKILL)
    holder.communicate()
    assert read_holder(run / LOCK_NAME)["pid"] == holder.pid  # left behind by the dead holder

    done = subprocess.run([sys.executable, "-m", "lmforge", "tokenizer", "train", "--input",
                           str(corpus), "--vocab-size", "280", "--out", str(run)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"stale lock of {run}" in done.stderr and f"pid {holder.pid}" in done.stderr
    assert (run / "tokenizer.json").is_file() and not (run / LOCK_NAME).exists()


def test_the_lock_is_reentrant_names_its_holder_and_is_taken_by_rank_0_only(tmp_path, monkeypatch):
    with run_lock(tmp_path / "a", "run"):
        holder = read_holder(tmp_path / "a" / LOCK_NAME)
        assert holder["pid"] == os.getpid() and holder["command"] == "run"
        with run_lock(tmp_path / "a", "report"):  # the same process: a stage inside the run
            pass
        assert (tmp_path / "a" / LOCK_NAME).exists()
    assert not (tmp_path / "a" / LOCK_NAME).exists()
    monkeypatch.setenv("RANK", "1")
    with run_lock(tmp_path / "b", "pretrain"):
        assert not (tmp_path / "b" / LOCK_NAME).exists()


def test_a_new_pretrain_run_refuses_a_folder_of_other_files(tmp_path, capsys):
    (tmp_path / "shards").mkdir()
    (tmp_path / "config.toml").write_text("# the user's\n")  # a run's name, but with other files
    capsys.readouterr()
    assert main(["pretrain", "--data", str(tmp_path / "shards"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a run's (shards)" in err, err
    assert (tmp_path / "config.toml").read_text() == "# the user's\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml", "shards"]
