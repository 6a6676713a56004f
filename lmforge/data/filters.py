"""Heuristic quality filters in the style of Gopher (Rae et al. 2021, appendix A) and C4.

`quality_problem(text, kind, cfg)` returns the first rule a document fails as `(rule, value)`, or
None when it passes. Prose ("text") gets the Gopher rules: word-count bounds, mean word length,
symbol-to-word ratio, share of alphabetic words, bullet and ellipsis lines, duplicated lines and
paragraphs, and n-gram repetition (the most frequent 2/3/4-gram and characters inside duplicated
5..10-grams). Code gets rules of its own (StarCoder style) because indentation, short identifiers
and repeated lines are normal there: minimum size, longest line, mean line length, share of
alphanumeric characters.
"""

from __future__ import annotations

import re

import numpy as np

from lmforge.config import FilterConfig
from lmforge.data.ngrams import ngram_hashes, text_word_hashes

# Every rule name `quality_problem` can return, in the order the rules are tried.
RULES = (
    "min_words", "max_words", "mean_word_length", "symbol_word_ratio", "alpha_words",
    "bullet_lines", "ellipsis_lines", "duplicate_lines", "duplicate_paragraphs",
    "top_2gram", "top_3gram", "top_4gram", *(f"duplicate_{n}gram" for n in range(5, 32)),
    "code_min_chars", "code_max_line_length", "code_mean_line_length", "code_alnum_fraction",
)
ELLIPSES = ("...", "…")
# Whitespace-separated words made only of digits, underscores and punctuation (no letter).
_WORD_WITHOUT_LETTER = re.compile(r"(?<!\S)(?:[^\w\s]|[\d_])+(?!\S)")
_BULLET_LINE = re.compile(r"^[ \t]*[•\-*‣◦⁃·▪]", re.MULTILINE)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|…)[ \t]*$", re.MULTILINE)


def quality_problem(text: str, kind: str, cfg: FilterConfig,
                    lower_words: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[str, float] | None:
    """The first failed rule and the measured value, or None when the document passes.

    `lower_words` (`text_word_hashes(text.lower().encode())`: hashes and byte lengths of the
    lower-cased words) may be passed when the caller has them already.
    """
    if not cfg.enabled:
        return None
    if kind == "code":
        return _code_problem(text, cfg)
    return _prose_problem(text, cfg, lower_words)


def _prose_problem(text: str, cfg: FilterConfig,
                   lower_words: tuple[np.ndarray, np.ndarray] | None) -> tuple[str, float] | None:
    words = text.split()
    n = len(words)
    if n < cfg.min_words:
        return "min_words", n
    if n > cfg.max_words:
        return "max_words", n
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=n)
    mean_len = float(lengths.mean())
    if not cfg.min_mean_word_length <= mean_len <= cfg.max_mean_word_length:
        return "mean_word_length", round(mean_len, 2)
    symbols = text.count("#") + sum(text.count(e) for e in ELLIPSES)
    if symbols / n > cfg.max_symbol_word_ratio:
        return "symbol_word_ratio", round(symbols / n, 3)
    alpha = 1.0 - len(_WORD_WITHOUT_LETTER.findall(text)) / n
    if alpha < cfg.min_alpha_word_fraction:
        return "alpha_words", round(alpha, 3)

    lines = [ln for ln in text.split("\n") if ln.strip()]
    if lines:
        bullet = len(_BULLET_LINE.findall(text)) / len(lines)
        if bullet > cfg.max_bullet_line_fraction:
            return "bullet_lines", round(bullet, 3)
        ellipsis = len(_ELLIPSIS_LINE.findall(text)) / len(lines)
        if ellipsis > cfg.max_ellipsis_line_fraction:
            return "ellipsis_lines", round(ellipsis, 3)
        dup = _repeated_fraction([ln.strip() for ln in lines])
        if dup > cfg.max_duplicate_line_fraction:
            return "duplicate_lines", round(dup, 3)
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    dup = _repeated_fraction(paragraphs)
    if dup > cfg.max_duplicate_paragraph_fraction:
        return "duplicate_paragraphs", round(dup, 3)

    if lower_words is None:
        lower_words = text_word_hashes(text.lower().encode("utf-8", "surrogatepass"))
    return _ngram_problem(*lower_words, cfg)


def _repeated_fraction(items: list[str]) -> float:
    """Share of items equal to an earlier item."""
    return (len(items) - len(set(items))) / len(items) if items else 0.0


def _ngram_problem(hashes: np.ndarray, lengths: np.ndarray,
                   cfg: FilterConfig) -> tuple[str, float] | None:
    """Gopher's repetition rules; shares are of the bytes inside words."""
    total_chars = float(lengths.sum())
    char_prefix = np.concatenate([[0], np.cumsum(lengths)])
    for n, limit in zip(range(2, 5), cfg.max_top_ngram_fraction):
        grams = ngram_hashes(hashes, n)
        if len(grams) == 0:
            break
        _, first, counts = np.unique(grams, return_index=True, return_counts=True)
        top = int(np.argmax(counts))
        if counts[top] < 2:
            continue
        start = int(first[top])
        share = counts[top] * float(char_prefix[start + n] - char_prefix[start]) / total_chars
        if share > limit:
            return f"top_{n}gram", round(float(share), 3)
    for n, limit in zip(range(5, 5 + len(cfg.max_duplicate_ngram_fraction)),
                        cfg.max_duplicate_ngram_fraction):
        grams = ngram_hashes(hashes, n)
        if len(grams) == 0:
            break
        _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        if len(starts) == 0:
            continue
        # Words covered by at least one duplicated n-gram (overlaps counted once).
        edges = np.zeros(len(hashes) + 1, dtype=np.int64)
        np.add.at(edges, starts, 1)
        np.add.at(edges, starts + n, -1)
        covered = np.cumsum(edges[:-1]) > 0
        share = float(lengths[covered].sum()) / total_chars
        if share > limit:
            return f"duplicate_{n}gram", round(share, 3)
    return None


def _code_problem(text: str, cfg: FilterConfig) -> tuple[str, float] | None:
    if len(text) < cfg.code_min_chars:
        return "code_min_chars", len(text)
    lengths = [len(ln) for ln in text.split("\n")]
    longest = max(lengths)
    if longest > cfg.code_max_line_length:
        return "code_max_line_length", longest
    mean = sum(lengths) / len(lengths)
    if mean > cfg.code_max_mean_line_length:
        return "code_mean_line_length", round(mean, 1)
    alnum = sum(map(str.isalnum, text)) / len(text)
    if alnum < cfg.code_min_alnum_fraction:
        return "code_alnum_fraction", round(alnum, 3)
    return None
