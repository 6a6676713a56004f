"""Read raw documents from the places a user names: the one reader of sources, used by
`data prepare`, `lmforge run` and (through `lmforge.tokenizer.sources`) `tokenizer train / stats`.

A source is a file, a directory (all files below it, sorted), a glob, or `builtin:default`.
Files are read by their suffix: `.jsonl` / `.ndjson` (one JSON object per line, text in
`data.text_field`), `.parquet` (the `text_field` column), anything else as one plain-text
document; a trailing `.gz` is decompressed first. Source code files (by suffix) become documents
of kind "code", which get their own quality rules.

Nothing valid is dropped silently: malformed JSONL lines, bytes that are not UTF-8 and empty files
are counted in a `ReadReport` with `file:line`; with `strict=True` the first one is a UserError.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lmforge.errors import UserError

CODE_SUFFIXES = frozenset({
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts",
    ".sh", ".rb", ".jl", ".lua", ".kt", ".swift", ".scala", ".cs", ".sql",
})
JSONL_SUFFIXES = frozenset({".jsonl", ".ndjson"})
MAX_PROBLEMS_LISTED = 20  # problems kept verbatim in the report; the rest are only counted


@dataclass
class Document:
    """One unit of text: a file, a JSONL record, a Parquet row, a chapter of the builtin corpus."""

    text: str
    source: str  # the source spec it came from, e.g. "corpus/" or "builtin:default"
    id: str  # where exactly: "corpus/a.txt", "data.jsonl:17", "builtin:default/bible/Genesis 1"
    kind: str = "text"  # "text" or "code"


@dataclass
class ReadReport:
    """What reading found besides documents: problems are `file:line: reason` strings."""

    files: int = 0
    documents: int = 0
    bytes: int = 0
    empty_files: int = 0
    malformed: int = 0
    decode_errors: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, message: str, strict: bool) -> None:
        if strict:
            raise UserError(f"{message} (--strict / data.strict turns malformed input into an error)")
        if len(self.problems) < MAX_PROBLEMS_LISTED:
            self.problems.append(message)

    def summary(self) -> dict:
        """The counts as a manifest stores them (`warning_lines` reads this back)."""
        return {"documents": self.documents, "bytes": self.bytes, "files": self.files,
                "empty_files": self.empty_files, "malformed_lines": self.malformed,
                "decode_errors": self.decode_errors, "problems": list(self.problems)}


def warning_lines(read: dict) -> list[str]:
    """What every command that reads sources prints about them: each problem, then the counts."""
    lines = [f"warning: {p}" for p in read["problems"]]
    hidden = read["malformed_lines"] + read["decode_errors"] - len(read["problems"])
    if hidden > 0:
        lines.append(f"warning: ... and {hidden} more malformed inputs")
    lines.append(f"malformed lines: {read['malformed_lines']}, undecodable files: "
                 f"{read['decode_errors']}, empty files: {read['empty_files']}")
    return lines


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
        elif path.exists():
            raise UserError(f"{spec}: not a regular file or directory")
        else:
            raise UserError(f"{spec}: no such file or directory")
    return files


def resolve_files(spec: str) -> list[Path]:
    """The files a (non-builtin) source spec names, sorted; a UserError when it names nothing."""
    return expand_inputs([spec])


def iter_documents(
    sources: list[str],
    text_field: str = "text",
    strict: bool = False,
    report: ReadReport | None = None,
    builtin_code_max_bytes: int = 4_000_000,
) -> Iterator[Document]:
    """Every document of every source, in a deterministic order."""
    report = report if report is not None else ReadReport()
    for spec in sources:
        if spec.startswith("builtin:"):
            from lmforge.data.builtin import builtin_documents

            docs = builtin_documents(spec, code_max_bytes=builtin_code_max_bytes)
        else:
            docs = _file_documents(spec, text_field, strict, report)
        for doc in docs:
            report.documents += 1
            report.bytes += len(doc.text.encode("utf-8"))
            yield doc


def _file_documents(spec: str, text_field: str, strict: bool, report: ReadReport) -> Iterator[Document]:
    for path in resolve_files(spec):
        report.files += 1
        name = path.name[:-3] if path.name.endswith(".gz") else path.name
        suffix = Path(name).suffix.lower()
        if suffix == ".parquet":
            yield from _parquet_documents(path, spec, text_field, strict, report)
        elif suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, spec, text_field, strict, report)
        else:
            raw = _read_bytes(path)
            if not raw.strip():
                report.empty_files += 1
                continue
            text = _decode(raw, str(path), strict, report)
            kind = "code" if suffix in CODE_SUFFIXES else "text"
            yield Document(text=text, source=spec, id=str(path), kind=kind)


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")  # type: ignore[return-value]


def _read_bytes(path: Path) -> bytes:
    try:
        with _open(path) as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise UserError(f"{path}: cannot read: {e}") from None


def _decode(raw: bytes, where: str, strict: bool, report: ReadReport) -> str:
    """UTF-8 text; invalid bytes become U+FFFD and are reported (an error under strict)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        report.decode_errors += 1
        report.problem(f"{where}:{line}: bytes that are not UTF-8 (replaced with U+FFFD)", strict)
        return raw.decode("utf-8", errors="replace")


def _jsonl_documents(
    path: Path, spec: str, text_field: str, strict: bool, report: ReadReport
) -> Iterator[Document]:
    """One document per line, streamed (a JSONL file may be far larger than memory)."""
    records = 0
    try:
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                records += 1
                text = _jsonl_text(line, f"{path}:{lineno}", text_field, strict, report)
                if text is not None:
                    yield Document(text=text, source=spec, id=f"{path}:{lineno}", kind="text")
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    if records == 0:
        report.empty_files += 1


def _jsonl_text(line: bytes, where: str, text_field: str, strict: bool, report: ReadReport) -> str | None:
    """The text of one JSONL record, or None (counted and reported) when the line is malformed."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        problem = f"malformed JSON ({str(e).split(':')[0]})"
    else:
        if not isinstance(record, dict):
            problem = f"expected a JSON object, got {type(record).__name__}"
        elif isinstance(record.get(text_field), str):
            return record[text_field]
        else:
            value = record.get(text_field)
            what = "missing" if value is None else f"a {type(value).__name__}, not a string"
            problem = f"field {text_field!r} is {what}"
    report.malformed += 1
    report.problem(f"{where}: {problem}", strict)
    return None


def _parquet_documents(
    path: Path, spec: str, text_field: str, strict: bool, report: ReadReport
) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file: {e}") from None
    if text_field not in pf.schema_arrow.names:
        raise UserError(
            f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "set data.text_field"
        )
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                yield Document(text=value, source=spec, id=f"{path}:row{row}", kind="text")
            else:
                report.malformed += 1
                report.problem(f"{path}:row{row}: {text_field!r} is {value!r}, not a string", strict)


def input_bytes(sources: list[str]) -> int | None:
    """About how many bytes of text the sources hold (for progress ETAs); None for builtin ones."""
    total = 0
    for spec in sources:
        if spec.startswith("builtin:"):
            return None
        for path in resolve_files(spec):
            size = path.stat().st_size
            if path.name.endswith(".gz") and size >= 18:  # a gzip header + trailer at least
                with open(path, "rb") as f:  # the trailer holds the size mod 2**32
                    f.seek(-4, os.SEEK_END)
                    size = int.from_bytes(f.read(4), "little")
            total += size
    return total


def file_fingerprint(spec: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of every file a spec names: part of the key deciding resumption."""
    if spec.startswith("builtin:"):
        return []
    return [(str(p), (st := os.stat(p)).st_size, st.st_mtime_ns) for p in resolve_files(spec)]
