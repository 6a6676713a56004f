"""Decontamination: find training documents that share a long n-gram with reference texts.

If a training document contains any 13 consecutive words of an evaluation set, the model may
learn the answer rather than the skill (GPT-3 used 13-grams for this check). Words are compared
lower-cased with punctuation stripped, so formatting differences do not hide an overlap.

References are files (the forms of data.sources) or benchmarks: `eval:all`, `eval:core`,
`eval:gsm8k,mmlu`, ... take the items of those `lmforge eval` tasks as reference texts
(lmforge/eval/references.py). `matched(text)` names the references a document overlaps, so the
data stage reports which benchmark (or "files") each removed document came close to.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import numpy as np

from lmforge.data.ngrams import ngram_hashes, text_word_hashes
from lmforge.data.sources import ReadReport, file_fingerprint, iter_documents

_WORD = re.compile(r"\w+")


def normalised_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def text_ngrams(text: str, n: int) -> np.ndarray:
    """Hashes of every n-gram of the normalised words of `text`."""
    words = " ".join(normalised_words(text)).encode("utf-8", "surrogatepass")
    return ngram_hashes(text_word_hashes(words)[0], n)


FILES = "files"  # the label of references read from files


def _is_benchmark(spec: str) -> bool:
    from lmforge.eval.references import is_benchmark_reference

    return is_benchmark_reference(spec)


def reference_texts(references: list[str], text_field: str = "text") -> Iterator[tuple[str, str]]:
    """(label, text) of every reference: FILES for files, the task name for a benchmark item."""
    files = [r for r in references if not _is_benchmark(r)]
    if files:
        for doc in iter_documents(files, text_field, report=ReadReport()):
            yield FILES, doc.text
    for spec in references:
        if _is_benchmark(spec):
            from lmforge.eval.references import benchmark_texts

            yield from benchmark_texts(spec)


def reference_fingerprint(spec: str) -> list:
    """What a reference's texts depend on (files: path, size, mtime; benchmarks: pinned hashes)."""
    if _is_benchmark(spec):
        from lmforge.eval.references import fingerprint

        return fingerprint(spec)
    return file_fingerprint(spec)


class Decontaminator:
    """Holds the sorted n-gram hashes of the references, by label; `overlaps(text)` counts
    shared n-grams, `matched(text)` names the labels they come from."""

    def __init__(self, references: list[str], ngram: int = 13, text_field: str = "text"):
        self.ngram = ngram
        grams: dict[str, list[np.ndarray]] = {}
        for label, text in reference_texts(references, text_field):
            grams.setdefault(label, []).append(text_ngrams(text, ngram))
        self.by_label = {label: np.unique(np.concatenate(g)) for label, g in grams.items()}
        self.reference_ngrams = (np.unique(np.concatenate(list(self.by_label.values())))
                                 if self.by_label else np.empty(0, np.uint64))

    def overlaps(self, text: str) -> int:
        if len(self.reference_ngrams) == 0:
            return 0
        return int(np.isin(text_ngrams(text, self.ngram), self.reference_ngrams,
                           assume_unique=False).sum())

    def matched(self, text: str) -> list[str]:
        """The labels (FILES or benchmark tasks) whose references share an n-gram with `text`."""
        grams = text_ngrams(text, self.ngram)
        return [label for label, ref in self.by_label.items() if np.isin(grams, ref).any()]
