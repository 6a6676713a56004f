"""Tokenizer training text: the documents of `lmforge.data.sources`, cut into bounded pieces.

There is one reader of sources (`lmforge.data.sources`): `tokenizer train`, `tokenizer stats` and
`data prepare` see the same documents from the same files (`.jsonl` / `.ndjson` as JSON lines,
bytes that are not UTF-8 replaced and reported, or an error under `data.strict`).

`iter_texts(["corpus/", "extra/*.txt", "docs.jsonl"])` yields str pieces in a deterministic
order. A long document is yielded in pieces of about `PIECE_CHARS` characters, cut only where a
line starts with a non-space character; with the GPT-4 style pattern no chunk spans such a cut,
so the counts are exactly those of whole documents while worker messages stay small.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lmforge.data.sources import ReadReport, expand_inputs, iter_documents

__all__ = ["PIECE_CHARS", "expand_inputs", "iter_texts"]

PIECE_CHARS = 1 << 20


def iter_texts(
    inputs: Iterable[str],
    text_field: str = "text",
    strict: bool = False,
    report: ReadReport | None = None,
) -> Iterator[str]:
    """Yield the text of every document of `inputs`, piece by piece (problems go to `report`)."""
    for doc in iter_documents(list(inputs), text_field=text_field, strict=strict, report=report):
        yield from _pieces(doc.text)


def _pieces(text: str) -> Iterator[str]:
    start = 0
    while len(text) - start > PIECE_CHARS:
        lo, hi = start, start + PIECE_CHARS
        # The last cut in the first window that has one (a long indented block spans windows).
        while (cut := _last_cut(text, lo, hi)) == lo and hi < len(text):
            lo, hi = hi, hi + PIECE_CHARS
        if cut == lo:  # no cut left: the rest is one piece
            break
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _last_cut(text: str, start: int, end: int) -> int:
    """Index just after the last line break in text[start:end] that is followed by a non-space
    character (`start` when there is none)."""
    while (i := max(text.rfind("\n", start, end), text.rfind("\r", start, end))) >= 0:
        if i + 1 < len(text) and not text[i + 1].isspace():
            return i + 1
        end = i
    return start
