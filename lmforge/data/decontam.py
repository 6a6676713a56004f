"""Decontamination: find training documents that share a long n-gram with reference texts.

If a training document contains any 13 consecutive words of an evaluation set, the model may
learn the answer rather than the skill (GPT-3 used 13-grams for this check). Words are compared
lower-cased with punctuation stripped, so formatting differences do not hide an overlap.
"""

from __future__ import annotations

import re

import numpy as np

from lmforge.data.ngrams import ngram_hashes, text_word_hashes
from lmforge.data.sources import ReadReport, iter_documents

_WORD = re.compile(r"\w+")


def normalised_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def text_ngrams(text: str, n: int) -> np.ndarray:
    """Hashes of every n-gram of the normalised words of `text`."""
    words = " ".join(normalised_words(text)).encode("utf-8", "surrogatepass")
    return ngram_hashes(text_word_hashes(words)[0], n)


class Decontaminator:
    """Holds the sorted n-gram hashes of the references; `overlaps(text)` counts shared n-grams."""

    def __init__(self, references: list[str], ngram: int = 13, text_field: str = "text"):
        self.ngram = ngram
        grams = [text_ngrams(doc.text, ngram)
                 for doc in iter_documents(references, text_field, report=ReadReport())]
        self.reference_ngrams = np.unique(np.concatenate(grams)) if grams else np.empty(0, np.uint64)

    def overlaps(self, text: str) -> int:
        if len(self.reference_ngrams) == 0:
            return 0
        return int(np.isin(text_ngrams(text, self.ngram), self.reference_ngrams,
                           assume_unique=False).sum())
