"""The data stage end to end on a messy corpus built here: what survives, what is removed, reports,
strictness, resumption, damaged shards and empty results."""

from __future__ import annotations

import gzip
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import load_config
from lmforge.data import prepare as prepare_module
from lmforge.data.prepare import curate, curated_texts, prepare
from lmforge.data.shards import HEADER_SIZE, open_shard, read_header
from lmforge.errors import UserError

SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "ne", "dil", "po", "gar", "est", "un", "fi"]


def prose(rng: random.Random, n_words: int) -> str:
    """Readable-looking text over a large made-up vocabulary: passes every quality rule."""
    vocab = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))) for _ in range(3000)]
    sentences, words = [], 0
    while words < n_words:
        k = rng.randint(6, 14)
        sentences.append(" ".join(rng.choice(vocab) for _ in range(k)).capitalize() + ".")
        words += k
    paragraphs = [" ".join(sentences[i : i + 4]) for i in range(0, len(sentences), 4)]
    return "\n\n".join(paragraphs)


def edit_words(text: str, rng: random.Random, n: int) -> str:
    words = text.split(" ")
    for i in rng.sample(range(len(words)), n):
        words[i] = "zzedit"
    return " ".join(words)


CODE = '''"""A small module."""

import math


def area(radius: float) -> float:
    """Area of a circle."""
    return math.pi * radius ** 2


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def add(self, n: int = 1) -> int:
        self.count += n
        return self.count
'''


def make_messy_corpus(root: Path) -> tuple[Path, set[str], dict[str, str]]:
    """Returns (corpus dir, ids expected to survive, named documents)."""
    rng = random.Random(0)
    corpus = root / "corpus"
    (corpus / "sub").mkdir(parents=True)
    good = [prose(rng, 300) for _ in range(8)]
    for i, text in enumerate(good):
        (corpus / f"good_{i}.txt").write_text(text, encoding="utf-8")
    # Exact duplicate of good_0 up to case and whitespace; near duplicate of good_1 (3 words edited).
    (corpus / "sub" / "exact_dup.txt").write_text("  " + good[0].upper().replace(" ", "  \t"))
    (corpus / "sub" / "near_dup.txt").write_text(edit_words(good[1], rng, 3))
    # Spam and boilerplate.
    (corpus / "spam.txt").write_text("BUY CHEAP PILLS NOW!!! Best price, click here. " * 60)
    (corpus / "boilerplate.txt").write_text("Home | About | Contact\nCookie policy\nAll rights reserved.")
    (corpus / "menu.txt").write_text("\n".join(f"- item {i} ..." for i in range(80)))
    # Code: a normal module survives, a minified one-liner does not.
    (corpus / "module.py").write_text(CODE)
    (corpus / "minified.js").write_text("var a=" + ",".join(str(i) for i in range(2000)) + ";")
    # Bytes that are not UTF-8 inside otherwise good text (line 3).
    broken = prose(rng, 200).split("\n\n")
    (corpus / "latin1.txt").write_bytes(
        broken[0].encode() + b"\n\ncaf\xe9 au lait\n\n" + "\n\n".join(broken[1:]).encode())
    # Empty files.
    (corpus / "empty.txt").write_text("")
    (corpus / "blank.txt").write_text("  \n\n ")
    # JSONL: good, malformed JSON, missing field, good, not an object, wrong type, good.
    jsonl_good = [prose(rng, 120) for _ in range(3)]
    lines = [json.dumps({"text": jsonl_good[0]}), '{"text": "unterminated', json.dumps({"body": "x"}),
             json.dumps({"text": jsonl_good[1]}), "[1, 2, 3]", json.dumps({"text": 42}),
             json.dumps({"text": jsonl_good[2]})]
    (corpus / "records.jsonl").write_text("\n".join(lines) + "\n")
    # Gzip and Parquet inputs.
    with gzip.open(corpus / "packed.txt.gz", "wt", encoding="utf-8") as f:
        f.write(prose(rng, 250))
    pq.write_table(pa.table({"text": [prose(rng, 150), prose(rng, 150)]}), corpus / "table.parquet")

    expected = {str(corpus / f"good_{i}.txt") for i in range(8)}
    expected |= {str(corpus / "module.py"), str(corpus / "latin1.txt"), str(corpus / "packed.txt.gz")}
    expected |= {f"{corpus / 'records.jsonl'}:{n}" for n in (1, 4, 7)}
    expected |= {f"{corpus / 'table.parquet'}:row{n}" for n in (1, 2)}
    return corpus, expected, {"good0": good[0], "good1": good[1]}


def curated_ids(out: Path) -> set[str]:
    ids = set()
    for split in ("train", "val"):
        with open(out / "curated" / f"{split}.jsonl", encoding="utf-8") as f:
            ids |= {json.loads(line)["id"] for line in f}
    return ids


@pytest.fixture(scope="module")
def messy(tmp_path_factory):
    root = tmp_path_factory.mktemp("messy")
    corpus, expected, named = make_messy_corpus(root)
    from lmforge.tokenizer import train_tokenizer

    tok = train_tokenizer([named["good0"], named["good1"], CODE], 320, workers=1, progress=False)
    tok.save(root / "tok")
    return root, corpus, expected


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True,
                          env=full_env, timeout=300)


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def test_cli_prepare_messy_corpus(messy):
    root, corpus, expected = messy
    out = root / "out_cli"
    r = run_cli("data", "prepare", "--source", str(corpus), "--tokenizer", str(root / "tok"),
                "--out", str(out), "--set", "data.workers=2", "--set", "data.val_fraction=0.2",
                "--set", "data.shard_tokens=3000")
    assert r.returncode == 0, r.stderr
    assert curated_ids(out) == expected  # nothing valid lost, every bad document gone

    manifest = json.loads((out / "manifest.json").read_text())
    assert stage(manifest, "exact dedup")["removed_docs"] == 1
    assert stage(manifest, "exact dedup")["examples"][0]["id"].endswith("exact_dup.txt")
    assert stage(manifest, "near dedup")["removed_docs"] == 1
    assert stage(manifest, "near dedup")["examples"][0]["duplicate_of"].endswith("good_1.txt")
    removed_by_filters = {ex["id"] for s in manifest["stages"] if s["name"].startswith("filter")
                          for ex in s["examples"]}
    assert {str(corpus / n) for n in ("spam.txt", "boilerplate.txt", "menu.txt", "minified.js")} <= removed_by_filters
    read = manifest["read"]
    assert (read["malformed_lines"], read["decode_errors"], read["empty_files"]) == (4, 1, 2)

    # The report names the counts and each malformed line with file:line.
    for n in (2, 3, 5, 6):
        assert f"records.jsonl:{n}:" in r.stdout
    assert "latin1.txt:3: bytes that are not UTF-8" in r.stdout
    assert "exact dedup" in r.stdout and "near dedup" in r.stdout
    assert "malformed lines: 4, undecodable files: 1, empty files: 2" in r.stdout

    # Shards hold every curated document followed by <|endoftext|>, split by split.
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(out / "tokenizer")
    assert tok.content_hash == load_tokenizer(root / "tok").content_hash
    for split in ("train", "val"):
        info = manifest["splits"][split]
        tokens = np.concatenate([np.asarray(open_shard(out / s["file"])) for s in info["shards"]])
        assert [s["tokens"] for s in info["shards"][:-1]] == [3000] * (len(info["shards"]) - 1)
        expected_tokens = [t for text in curated_texts(out, split) for t in [*tok.encode(text), tok.eot_id]]
        assert tokens.tolist() == expected_tokens
        assert info["tokens"] == len(expected_tokens) and info["documents"] >= 1
        assert read_header(out / info["shards"][0]["file"]).itemsize == 2  # vocab < 65536: uint16

    inspect = run_cli("data", "inspect", str(out), "--samples", "2", "--seq-len", "16")
    assert inspect.returncode == 0, inspect.stderr
    assert "checksums ok" in inspect.stdout and "sample 2" in inspect.stdout


def test_strict_turns_malformed_lines_into_exit_2(messy):
    root, corpus, _ = messy
    r = run_cli("data", "prepare", "--source", str(corpus / "records.jsonl"), "--tokenizer",
                str(root / "tok"), "--out", str(root / "out_strict"), "--strict")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "records.jsonl:2: malformed JSON" in r.stderr


def test_empty_result_is_a_clear_error(messy, tmp_path):
    root, corpus, _ = messy
    r = run_cli("data", "prepare", "--source", str(corpus / "spam.txt"), "--source",
                str(corpus / "boilerplate.txt"), "--tokenizer", str(root / "tok"), "--out",
                str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "nothing left to train on: all 2 documents" in r.stderr


def test_missing_source_is_a_clear_error(tmp_path):
    r = run_cli("data", "prepare", "--source", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and "nope" in r.stderr and "Traceback" not in r.stderr


def small_config(corpus: Path, *overrides: str):
    return load_config(overrides=[f"data.sources=[{json.dumps(str(corpus))}]", "data.workers=1",
                                  "data.val_fraction=0.2", *overrides])


def test_decontamination_drops_or_flags(messy, tmp_path):
    root, corpus, _ = messy
    good3 = (corpus / "good_3.txt").read_text().split()
    reference = tmp_path / "eval.txt"
    reference.write_text("Question: " + " ".join(good3[100:115]) + " ?")  # a 15-word overlap
    refs = f"data.decontam.references=[{json.dumps(str(reference))}]"
    stats = curate(small_config(corpus, refs).data, tmp_path / "drop")
    dropped = next(s for s in stats["stages"] if s["name"] == "decontam (drop)")
    assert [e["id"] for e in dropped["examples"]] == [str(corpus / "good_3.txt")]
    stats = curate(small_config(corpus, refs, "data.decontam.action=flag").data, tmp_path / "flag")
    assert stats["flagged"] == [str(corpus / "good_3.txt")]
    assert str(corpus / "good_3.txt") in curated_ids(tmp_path / "flag")


def test_prepare_resumes_after_interruption(messy, tmp_path, monkeypatch):
    root, corpus, _ = messy
    cfg = small_config(corpus, "data.shard_tokens=700")
    reference = prepare(cfg, tmp_path / "whole", tokenizer_dir=root / "tok", progress=False)

    real_write = prepare_module.write_shard
    calls = []

    def crash_after_three(path, tokens, vocab_size):
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while writing the fourth shard
        calls.append(path)
        real_write(path, tokens, vocab_size)

    out = tmp_path / "resumed"
    monkeypatch.setattr(prepare_module, "write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, out, tokenizer_dir=root / "tok", progress=False)
    monkeypatch.setattr(prepare_module, "write_shard", real_write)
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("*.bin")}
    assert len(kept) == 3

    resumed = prepare(cfg, out, tokenizer_dir=root / "tok", progress=False)
    assert resumed["resumed"]  # curation was not redone
    assert {p: (out / p).stat().st_mtime_ns for p in kept} == kept  # finished shards untouched
    assert resumed["splits"] == reference["splits"]
    for split in ("train", "val"):
        for shard in reference["splits"][split]["shards"]:
            a = (tmp_path / "whole" / shard["file"]).read_bytes()
            assert (out / shard["file"]).read_bytes() == a


def test_damaged_shards_name_the_file(messy, tmp_path):
    root, corpus, _ = messy
    out = tmp_path / "out"
    manifest = prepare(small_config(corpus, "data.shard_tokens=2000"), out,
                       tokenizer_dir=root / "tok", progress=False)
    first = out / manifest["splits"]["train"]["shards"][0]["file"]
    second = out / manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray(first.read_bytes())
    data[HEADER_SIZE + 10] ^= 0xFF  # one flipped bit in the payload
    first.write_bytes(bytes(data))
    with pytest.raises(UserError, match=f"{first}: corrupt shard: checksum mismatch"):
        open_shard(first)
    second.write_bytes(second.read_bytes()[:-7])  # a truncated copy
    with pytest.raises(UserError, match=f"{second}: truncated shard"):
        read_header(second)
    r = run_cli("data", "inspect", str(out), "--samples", "0")
    assert r.returncode == 2 and str(first) in r.stderr and "Traceback" not in r.stderr
    from lmforge.data.loader import TokenLoader

    with pytest.raises(UserError, match=str(first)):
        TokenLoader(out, "train", seq_len=8, batch_size=2)


def test_trains_tokenizer_when_none_is_given(messy, tmp_path):
    root, corpus, _ = messy
    cfg = small_config(corpus, "tokenizer.vocab_size=300")
    manifest = prepare(cfg, tmp_path / "out", progress=False)
    from lmforge.tokenizer import load_tokenizer

    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert manifest["tokenizer"]["hash"] == tok.content_hash and tok.vocab_size <= 300
    again = prepare(cfg, tmp_path / "out", progress=False)  # reused, not retrained
    assert again["tokenizer"]["hash"] == tok.content_hash
