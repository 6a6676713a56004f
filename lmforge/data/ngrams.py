"""Word and n-gram hashes of a whole text at once with numpy, shared by the filters, MinHash and
decontamination.

A word is a maximal run of bytes that are not ASCII whitespace (what `bytes.split()` returns).
Its hash is a polynomial in its bytes modulo 2**64, sum_i (b_i + 1) * P**(L - 1 - i), passed
through the MurmurHash3 64-bit finaliser. Because P is odd it is invertible modulo 2**64, so the
polynomial of every word comes from one prefix sum over the text: with S[k] = sum_{i<k}
(b_i + 1) * P**-i, the word [s, e) hashes to P**(e - 1) * (S[e] - S[s]). No Python loop runs per
word. An n-gram's hash is again a polynomial, in its word hashes. `word_hash` and
`ngram_hash_of_words` compute the same values one at a time, as a readable reference.
"""

from __future__ import annotations

import numpy as np

_MASK = (1 << 64) - 1
_P = 0x100000001B3  # odd, so it has an inverse modulo 2**64
_P_INV = pow(_P, -1, 1 << 64)
_NGRAM_BASE = 0x9E3779B97F4A7C15  # odd multiplier of the n-gram polynomial
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True  # the bytes `bytes.split()` splits on

_powers = {"p": np.ones(1, dtype=np.uint64), "q": np.ones(1, dtype=np.uint64)}


def _power_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
    """P**k and P**-k modulo 2**64 for k < n (grown on demand, kept for the process)."""
    if len(_powers["p"]) < n:
        size = max(n, 2 * len(_powers["p"]))
        for key, base in (("p", _P), ("q", _P_INV)):
            table = np.full(size, base, dtype=np.uint64)
            table[0] = 1
            _powers[key] = np.cumprod(table, dtype=np.uint64)  # wraps modulo 2**64
    return _powers["p"], _powers["q"]


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: every input bit affects every output bit."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> np.uint64(33))


def text_word_hashes(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 hash, byte length) of every word of UTF-8 `data`, in order."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) == 0:
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    edges = np.diff(np.concatenate([[1], _SPACE[buf].view(np.int8), [1]]))
    starts, ends = np.flatnonzero(edges == -1), np.flatnonzero(edges == 1)
    p, q = _power_tables(len(buf) + 1)
    with np.errstate(over="ignore"):
        weighted = (buf.astype(np.uint64) + np.uint64(1)) * q[: len(buf)]
        prefix = np.concatenate([np.zeros(1, np.uint64), np.cumsum(weighted, dtype=np.uint64)])
        hashes = p[ends - 1] * (prefix[ends] - prefix[starts])
    return fmix64(hashes), (ends - starts).astype(np.int64)


def ngram_hashes(hashes: np.ndarray, n: int) -> np.ndarray:
    """Hash of every run of `n` consecutive words: sum_k hashes[i + k] * BASE**(n - 1 - k) mod 2**64.

    Returns len(hashes) - n + 1 values (none when there are fewer than n words).
    """
    count = len(hashes) - n + 1
    if count <= 0:
        return np.empty(0, dtype=np.uint64)
    out = hashes[:count].copy()
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out *= np.uint64(_NGRAM_BASE)
            out += hashes[k : k + count]
    return out


# -- the same hashes one value at a time: the readable definition, used by tests and datasketch --


def _fmix64(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK
    return h ^ (h >> 33)


def word_hash(word: bytes) -> int:
    h = 0
    for b in word:
        h = (h * _P + b + 1) & _MASK
    return _fmix64(h)


def ngram_hash_of_words(words: list[bytes]) -> int:
    h = 0
    for w in words:
        h = (h * _NGRAM_BASE + word_hash(w)) & _MASK
    return h
