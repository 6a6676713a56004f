"""Invariants of every command on bad input: a table of bad invocations, each run in a subprocess,
must exit non-zero with no traceback and change nothing outside its --out. Plus the expected
failures that cannot be provoked from outside (a full disk) and the smaller fixes of issue 13."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from train_fixtures import synthetic_documents

from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.model import Transformer
from lmforge.tokenizer import load_tokenizer, train_tokenizer

SMALL = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
         "model.n_kv_heads=1", "model.max_seq_len=32", "tokenizer.vocab_size=300"]


def corpus_text(i: int) -> str:
    """A deterministic short document (about a hundred words of simple sentences)."""
    return synthetic_documents(1, seed=i)[0] + "\n"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """Made once: a corpus, a tokenizer, a checkpoint with it, a NaN one, shards, a plain file."""
    root = tmp_path_factory.mktemp("invariants")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"d{i:02}.txt").write_text(corpus_text(i))
    tok = train_tokenizer([corpus_text(i) for i in range(40)], vocab_size=300, progress=False)
    tok.save(root / "tok")
    cfg = load_config(overrides=SMALL)
    torch.manual_seed(0)
    save_model(Transformer(cfg.model), cfg, root / "ckpt", tokenizer_dir=root / "tok")
    shutil.copytree(root / "ckpt", root / "nan_ckpt")
    state = load_file(root / "nan_ckpt" / "model.safetensors")
    state["norm.weight"][0] = float("nan")
    save_file(state, str(root / "nan_ckpt" / "model.safetensors"))
    shutil.copytree(root / "ckpt", root / "mismatch_ckpt")  # a tokenizer larger than the model's vocab
    train_tokenizer([corpus_text(i) for i in range(40)], vocab_size=400, progress=False).save(
        root / "mismatch_ckpt" / "tokenizer")
    r = run("data", "prepare", "--source", corpus, "--tokenizer", root / "tok", "--out", root / "shards",
            "--set", "data.workers=1", cwd=root)
    assert r.returncode == 0, r.stderr
    evil = root / "evil_shards"
    shutil.copytree(root / "shards", evil)
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../secret.bin"
    (evil / "manifest.json").write_text(json.dumps(manifest))
    (root / "secret.bin").write_bytes(b"not for your eyes")
    (root / "afile").write_text("a user's file\n")
    (root / "cwd").mkdir()
    return root


def run(*args, cwd: Path | None = None, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], input=stdin, cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a hash of its content (directories: "dir")."""
    out = {}
    for p in sorted(root.rglob("*")):
        try:
            out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        except FileNotFoundError:  # a case running alongside removed it (its lock file): its own --out
            continue
    return out


LONG_PROMPT = "the cat sat on the mat " * 4400  # ~100,000 characters, far past a 32-token context

# (bad invocation with {R} for the fixtures' root, the --out it may create or None, words of its one line)
BAD: list[tuple[list[str], str | None, str]] = [
    (["config", "show", "--set", "model.d_model=abc"], None, "model.d_model"),
    (["config", "show", "--set", "train.lr=inf"], None, "finite"),
    (["init", "--preset", "tiny", "--out", "{R}/afile"], None, "is a file"),
    (["init", "--preset", "tiny", "--set", "model.vocab_size=1000000000000", "--out", "{R}/new"], "new", "GiB"),
    (["model", "info", "--preset", "tiny", "--batch-size", "0"], None, "--batch-size"),
    (["model", "info", "--preset", "tiny", "--seq-len", "100000"], None, "max_seq_len=256"),
    (["model", "info", "--checkpoint", "{R}/missing"], None, "not found"),
    (["export", "hf", "--checkpoint", "{R}/ckpt", "--out", "{R}/afile"], None, "is a file"),
    (["export", "hf", "--checkpoint", "{R}/nan_ckpt", "--out", "{R}/new"], "new", "NaN"),
    (["export", "gguf", "--checkpoint", "{R}/ckpt", "--out", "{R}/afile"], "afile", "already exists"),
    (["export", "gguf", "--checkpoint", "{R}/nan_ckpt", "--out", "{R}/new.gguf"], "new.gguf", "NaN"),
    (["import", "hf", "--from", "{R}/corpus", "--out", "{R}/new"], "new", "config.json"),
    (["tokenizer", "train", "--input", "{R}/corpus", "--vocab-size", "300", "--out", "{R}/afile"], "afile", "afile"),
    (["tokenizer", "train", "--input", "{R}/missing", "--out", "{R}/new"], "new", "no such file"),
    (["tokenizer", "train", "--input", "{R}/corpus", "--workers", "0", "--out", "{R}/new"], "new", "--workers"),
    (["tokenizer", "encode", "--tokenizer", "{R}/missing"], None, "not found"),
    (["tokenizer", "decode", "--tokenizer", "{R}/tok"], None, "not a token id"),
    (["tokenizer", "stats", "--tokenizer", "{R}/tok", "--input", "{R}/missing"], None, "no such file"),
    (["tokenizer", "export", "--format", "hf", "--tokenizer", "{R}/tok", "--out", "{R}/afile"], "afile", "afile"),
    (["data", "prepare", "--source", "{R}/corpus", "--out", "{R}/afile"], "afile", "afile"),
    (["data", "prepare", "--source", "{R}/missing", "--out", "{R}/new"], "new", "no such file"),
    (["data", "inspect", "{R}/evil_shards"], None, "outside"),
    (["data", "inspect", "{R}/shards", "--seq-len", "0"], None, "--seq-len"),
    (["checkpoint", "consolidate", "{R}/ckpt", "--out", "{R}/new.safetensors"], "new.safetensors",
     "already a full checkpoint"),
    (["checkpoint", "consolidate", "{R}/missing", "--out", "{R}/new.safetensors"], "new.safetensors", "missing"),
    (["pretrain", "--data", "{R}/missing", "--out", "{R}/new"], "new", "missing"),
    (["pretrain", "--data", "{R}/shards", "--out", "{R}/new", "--set", "model.n_layers=100000"], "new", "GiB"),
    (["run", "--source", "{R}/corpus", "--out", "{R}/new", "--set", "model.n_layers=100000",
      "--time-budget", "none"], "new", "GiB"),
    (["plan", "--preset", "tiny", "--world-size", "0"], None, "--world-size"),
    (["plan", "--preset", "tiny", "--tokens-per-s", "inf"], None, "--tokens-per-s"),
    (["sample", "--checkpoint", "{R}/ckpt", "--device", "cuda:99"], None, "cuda:99"),
    (["sample", "--checkpoint", "{R}/ckpt", "--device", "gpu"], None, "not a device"),
    (["sample", "--checkpoint", "{R}/ckpt", "--temperature", "nan"], None, "--temperature"),
    (["sample", "--checkpoint", "{R}/ckpt", "--top-p", "2"], None, "top_p"),
    (["sample", "--checkpoint", "{R}/ckpt", "--max-new-tokens", "-1"], None, "--max-new-tokens"),
    (["sample", "--checkpoint", "{R}/ckpt", "--prompt", LONG_PROMPT], None, "max_seq_len=32"),
    (["sample", "--checkpoint", "{R}/nan_ckpt"], None, "NaN"),
    (["sample", "--checkpoint", "{R}/mismatch_ckpt"], None, "do not belong together"),
    (["run", "--source", "{R}/missing", "--out", "{R}/new", "--time-budget", "none"], "new", "no such file"),
    (["run", "--source", "{R}/corpus", "--out", "{R}/new", "--until", "train"], "new", "no such stage"),
    (["report", "{R}/missing"], None, "missing"),
    (["guide", "--pdf", "{R}/new.pdf", "--guide-dir", "{R}/missing"], "new.pdf", "not found"),
    (["guide", "--pdf", "{R}/afile"], None, "--force"),
    (["nonsense"], None, "unknown command"),
]


def own(case: tuple, text: str) -> str:
    """Each case writes its own `new_<index>`, so that cases can run side by side."""
    return text.replace("{R}/new", f"{{R}}/new_{BAD.index(case)}")


def out_of(case: tuple) -> str | None:
    return None if case[1] is None else own(case, "{R}/" + case[1]).removeprefix("{R}/")


@pytest.fixture(scope="module")
def results(world):
    """All bad invocations, three at a time, each with the tree before and after it."""
    def one(case):
        before = snapshot(world)
        r = run(*[own(case, a).replace("{R}", str(world)) for a in case[0]], cwd=world / "cwd", stdin="hello")
        return r, before, snapshot(world)

    with ThreadPoolExecutor(3) as pool:
        return dict(zip(map(id, BAD), pool.map(one, BAD), strict=True))


@pytest.mark.parametrize("case", BAD, ids=[" ".join(c[0][:3])[:40] for c in BAD])
def test_bad_invocation_fails_in_one_line_and_changes_nothing_else(world, results, case):
    argv, _, words = case
    r, before, after = results[id(case)]
    assert r.returncode != 0, (argv, r.stdout[-500:], r.stderr[-2000:])
    assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    error_lines = [line for line in r.stderr.splitlines() if "error" in line]
    assert error_lines and words.lower() in r.stderr.lower(), r.stderr[-2000:]
    # Nothing outside the given --out changed: the --out may have been created (not left
    # half-made), and the outs of the cases that ran alongside are theirs.
    outs = {o for o in map(out_of, BAD) if o is not None}
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert {p for p in changed if not any(p == o or p.startswith(o + "/") for o in outs)} == set(), changed
    if out_of(case) == "afile":
        assert (world / "afile").read_text() == "a user's file\n"
    assert not (world / "cwd").exists() or not any((world / "cwd").iterdir())
    # A refused prompt is not echoed whole before the error.
    assert len(r.stdout) < 10_000


def test_no_stray_temporary_files_anywhere(world, results):
    """Refused and failed commands leave no `.NAME.*.tmp` behind."""
    assert not [p for p in world.rglob("*.tmp")]


# -- expected failures that cannot be provoked from outside ---------------------------------------


@pytest.fixture
def disk_full(monkeypatch):
    """Every safetensors write fails as on a full disk, after writing part of its file."""
    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", full)

    def full_gguf(writer, *args, **kwargs):  # after the header and metadata are in the file
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with contextlib.suppress(ImportError):
        import gguf

        monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_gguf)


@pytest.mark.parametrize("argv", [
    ["init", "--preset", "tiny", "--set", "model.n_layers=1", "--out", "{T}/out"],
    ["export", "hf", "--checkpoint", "{R}/ckpt", "--out", "{T}/out"],
    ["export", "gguf", "--checkpoint", "{R}/ckpt", "--out", "{T}/out.gguf"],
])
def test_disk_full_is_one_line_and_leaves_no_partial_output(world, tmp_path, capsys, disk_full, argv):
    code = main([a.replace("{R}", str(world)).replace("{T}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "out of disk space" in err, err
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary directory


def test_unexpected_errors_keep_their_traceback(monkeypatch):
    """Only the classes of expected failure become one line; a bug is not hidden."""
    import lmforge.commands

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(lmforge.commands, "config_show", bug)
    with pytest.raises(KeyError):
        main(["config", "show"])


# -- the smaller ones of issue 13, item 8 --------------------------------------------------------


def test_model_info_and_plan_print_one_memory_estimate():
    """llama-7b, batch 1 x 4096: both say the same bf16-autocast total, and its fp32 master
    weights, gradients and AdamW moments are 16 bytes per parameter of the real model."""
    info = run("model", "info", "--preset", "llama-7b", "--batch-size", "1", "--seq-len", "4096")
    plan = run("plan", "--preset", "llama-7b", "--set", "train.batch_size=1", "--set", "train.seq_len=4096",
               "--tokens-per-s", "1000")
    assert info.returncode == plan.returncode == 0, info.stderr + plan.stderr
    info_total = re.search(r"^total\s+\S+ GiB\s+(\S+ GiB)", info.stdout, re.M).group(1)
    plan_total = re.search(r"/ (\S+ GiB) \(GPU: bf16 autocast", plan.stdout).group(1)
    assert info_total == plan_total
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(load_config(preset="llama-7b").model).parameters())
    states = [re.search(rf"^{k}\s+\S+ GiB\s+(\S+) GiB", info.stdout, re.M).group(1)
              for k in ("weights", "gradients", "AdamW state")]
    assert sum(map(float, states)) == pytest.approx(16 * n / 2**30, abs=0.02)


def test_sample_says_when_the_context_ends_the_text(world, tmp_path):
    """A model whose logits are all equal (final norm zeroed) greedily repeats id 0 and never
    ends the document, so the 32-token context ends it: sample must say so."""
    shutil.copytree(world / "ckpt", tmp_path / "flat")
    state = load_file(tmp_path / "flat" / "model.safetensors")
    state["norm.weight"].zero_()
    save_file(state, str(tmp_path / "flat" / "model.safetensors"))
    r = run("sample", "--checkpoint", tmp_path / "flat", "--prompt", "the cat", "--temperature", "0",
            "--max-new-tokens", "100")
    assert r.returncode == 0, r.stderr
    prompt_tokens = len(load_tokenizer(world / "tok").encode("the cat"))
    assert f"stopped after {32 - prompt_tokens} new tokens" in r.stderr and "context length" in r.stderr


def test_a_small_corpus_keeps_a_validation_split_one_evaluation_can_use(tmp_path):
    """200 short documents: 1% would be 2 documents, fewer tokens than one evaluation batch."""
    from lmforge.data.loader import TokenLoader

    corpus = tmp_path / "small"
    corpus.mkdir()
    for i in range(200):
        (corpus / f"d{i:03}.txt").write_text(corpus_text(i))
    batch, seq = 4, 64
    r = run("data", "prepare", "--source", corpus, "--out", tmp_path / "shards",
            *[a for o in [*SMALL, "model.max_seq_len=64", f"train.batch_size={batch}", "data.workers=1",
                          "data.dedup.near=false"] for a in ("--set", o)])
    assert r.returncode == 0, r.stderr
    val = TokenLoader(tmp_path / "shards", split="val", seq_len=seq, batch_size=batch, shuffle=False)
    train = TokenLoader(tmp_path / "shards", split="train", seq_len=seq, batch_size=batch, shuffle=False)
    assert batch <= val.windows_per_epoch < train.windows_per_epoch


def test_tokenizer_train_reads_sources_as_data_prepare_does(tmp_path):
    """Bad bytes and bad JSON lines are reported, not fatal (fatal under --strict), and .ndjson
    is JSON lines: the JSON syntax around the text is never learned."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "latin1.txt").write_bytes("café crème brûlée\n".encode("latin-1"))
    lines = [json.dumps({"text": corpus_text(i)}) for i in range(30)] + ["{broken"]
    (src / "docs.ndjson").write_text("\n".join(lines) + "\n")
    r = run("tokenizer", "train", "--input", src, "--vocab-size", "400", "--out", tmp_path / "tok")
    assert r.returncode == 0, r.stderr
    assert "latin1.txt:1: bytes that are not UTF-8" in r.stderr and "docs.ndjson:31: malformed JSON" in r.stderr
    tok = load_tokenizer(tmp_path / "tok")
    assert not any(b'"text"' in tok.token_bytes(i) or b'{"' in tok.token_bytes(i) for i in range(tok.vocab_size))
    strict = run("tokenizer", "train", "--input", src, "--strict", "--out", tmp_path / "tok2")
    assert strict.returncode == 2 and "docs.ndjson:31" in strict.stderr and "Traceback" not in strict.stderr
    assert not (tmp_path / "tok2").exists()
