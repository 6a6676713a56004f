"""`lmforge tokenizer ...` end to end in subprocesses, including bad input (exit 2, one line)."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])


def lmforge(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], input=stdin,
                          capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "src").mkdir()
    for name in ("textwrap.py", "heapq.py"):
        (root / "src" / name).write_text((STDLIB / name).read_text(encoding="utf-8"))
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"body": f"document {i} héllo 世界"})
                                               for i in range(50)))
    result = lmforge("tokenizer", "train", "--input", str(root / "src"), str(root / "docs.jsonl"),
                     "--text-field", "body", "--vocab-size", "600", "--out", str(root / "tok"),
                     "--set", 'tokenizer.special_tokens=["<|endoftext|>", "<|pad|>", "<|x|>"]')
    assert result.returncode == 0, result.stderr.decode()
    return root


def test_train_writes_a_loadable_tokenizer(trained):
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(trained / "tok")
    assert tok.vocab_size == 600
    assert list(tok.special_tokens) == ["<|endoftext|>", "<|pad|>", "<|x|>"]


def test_encode_decode_round_trip(trained):
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(trained / "tok")
    text = "def f(x):\r\n\treturn x  # 日本 👍 <|endoftext|>\n"
    enc = lmforge("tokenizer", "encode", "--tokenizer", str(trained / "tok"), stdin=text.encode())
    assert enc.returncode == 0, enc.stderr.decode()
    ids = [int(w) for w in enc.stdout.split()]
    assert ids == tok.encode(text)  # specials are text by default
    dec = lmforge("tokenizer", "decode", "--tokenizer", str(trained / "tok"), stdin=enc.stdout)
    assert dec.returncode == 0 and dec.stdout == text.encode()
    special = lmforge("tokenizer", "encode", "--tokenizer", str(trained / "tok"), "--allow-special",
                      stdin=b"<|endoftext|>")
    assert special.stdout.split() == [str(tok.eot_id).encode()]


def test_stats_and_exports(trained):
    stats = lmforge("tokenizer", "stats", "--tokenizer", str(trained / "tok"),
                    "--input", str(trained / "src"))
    assert stats.returncode == 0, stats.stderr.decode()
    assert b"bytes per token" in stats.stdout and b"vocabulary used" in stats.stdout
    for fmt, expected in (("hf", "tokenizer.json"), ("tiktoken", "tokenizer.tiktoken")):
        out = trained / f"export-{fmt}"
        result = lmforge("tokenizer", "export", "--format", fmt, "--tokenizer", str(trained / "tok"),
                         "--out", str(out))
        assert result.returncode == 0, result.stderr.decode()
        assert (out / expected).is_file()


@pytest.mark.parametrize("args, stdin, message", [
    (["tokenizer", "train", "--input", "/no/such/dir", "--out", "x"], b"", "no such file"),
    (["tokenizer", "train", "--input", "{src}", "--vocab-size", "200", "--out", "x"], b"",
     "tokenizer.vocab_size=200"),
    (["tokenizer", "encode", "--tokenizer", "/no/such/tok"], b"hi", "tokenizer file not found"),
    (["tokenizer", "decode", "--tokenizer", "{tok}"], b"1 2 three", "'three' is not a token id"),
    (["tokenizer", "decode", "--tokenizer", "{tok}"], b"1 999999", "outside the vocabulary"),
    (["tokenizer", "encode", "--tokenizer", "{src}"], b"hi", "tokenizer file not found"),
])
def test_bad_input_exits_2_with_one_line(trained, args, stdin, message):
    args = [a.format(src=trained / "src", tok=trained / "tok") for a in args]
    result = lmforge(*args, stdin=stdin)
    err = result.stderr.decode()
    assert result.returncode == 2, err
    assert message in err and "Traceback" not in err
    assert err.strip().count("\n") == 0


def test_corrupt_tokenizer_file_exits_2(trained, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"format": "lmforge-bpe", "version": 1, "merges": [')
    result = lmforge("tokenizer", "encode", "--tokenizer", str(tmp_path), stdin=b"x")
    assert result.returncode == 2
    assert "tokenizer.json" in result.stderr.decode() and b"Traceback" not in result.stderr
