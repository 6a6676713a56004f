"""Stream training text from files, directories, globs and JSONL, without loading a corpus whole.

`iter_texts(["corpus/", "extra/*.txt", "docs.jsonl"])` yields str pieces in a deterministic
order (sorted paths). Plain files are read in pieces of about `PIECE_CHARS` characters, cut only
where a line starts with a non-space character; with the GPT-4 style pattern no chunk spans such
a cut, so the counts are exactly those of whole files. `.jsonl` files yield one record's
`text_field` per line; `.gz` files are decompressed on the fly.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmforge.errors import UserError

PIECE_CHARS = 1 << 20


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named by `inputs` (files, directories searched recursively, glob patterns), sorted."""
    files: list[Path] = []
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise UserError(f"{path}: directory has no files")
            files.extend(found)
        elif glob.has_magic(spec):
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"{spec}: no files match this pattern")
            files.extend(found)
        else:
            raise UserError(f"{spec}: no such file or directory")
    return files


def iter_texts(inputs: Iterable[str], text_field: str = "text") -> Iterator[str]:
    """Yield the text of every input file, piece by piece."""
    for path in expand_inputs(inputs):
        if path.name.endswith((".jsonl", ".jsonl.gz")):
            yield from _jsonl_texts(path, text_field)
        else:
            yield from _file_texts(path)


def _open_text(path: Path) -> io.TextIOBase:
    raw = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115
    # newline="" keeps \r\n as it is: the tokenizer must see the exact text.
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def _file_texts(path: Path) -> Iterator[str]:
    carry = ""
    try:
        with _open_text(path) as f:
            while block := f.read(PIECE_CHARS):
                text = carry + block
                cut = _last_cut(text)
                carry = text[cut:]
                if cut:
                    yield text[:cut]
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if carry:
        yield carry


def _last_cut(text: str) -> int:
    """Index just after the last line break that is followed by a non-space character (0: none)."""
    end = len(text)
    while (i := max(text.rfind("\n", 0, end), text.rfind("\r", 0, end))) >= 0:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        end = i
    return 0


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: no string field {text_field!r} "
                                    "(choose the field with --text-field)")
                yield text
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason})") from None
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
