"""Deduplication: exact (hash of the normalised text) and near (MinHash signatures + LSH banding).

Near-duplicates are documents whose sets of word 5-grams ("shingles") have a high Jaccard
similarity |A & B| / |A | B|. MinHash estimates it: under a random permutation of shingle hashes,
P[min(A) == min(B)] = Jaccard(A, B), so the share of equal entries in two signatures of
`num_perm` minima is an unbiased estimate. LSH banding avoids comparing all pairs: signatures are
cut into `bands` bands of `rows` values; documents equal on a whole band land in the same bucket
and become candidates, which happens with probability 1 - (1 - J**rows)**bands (the S-curve).
Candidates are then kept as duplicates only if their estimated Jaccard reaches `threshold`.

Our permutations are datasketch's default "affine32" scheme (the same seed gives the same
permutations): a shingle hash h is mixed with the MurmurHash3 finaliser, then permutation i maps
it to a[i] * h + b[i] mod 2**32. So a datasketch MinHash fed our shingle hash function yields
exactly our signatures; we compute them for many documents at once with numpy instead of one
document (and one Python hash call per shingle) at a time.
"""

from __future__ import annotations

import hashlib

import numpy as np

from lmforge.data.ngrams import ngram_hash_of_words, ngram_hashes, text_word_hashes, word_hash

_BATCH_SHINGLES = 1 << 13  # shingles per vectorised block: (num_perm, block) uint32 fits in cache


def exact_key(text: str) -> bytes:
    """Hash of the text lower-cased with whitespace collapsed: equal keys are exact duplicates."""
    return hashlib.blake2b(" ".join(text.lower().split()).encode("utf-8"), digest_size=16).digest()


def shingle_words(text: str) -> list[bytes]:
    """The words shingles are built from: the lower-cased UTF-8 text split on ASCII whitespace."""
    return text.lower().encode("utf-8", "surrogatepass").split()


def shingle_hashes(text: str, ngram: int, lower_word_hashes: np.ndarray | None = None) -> np.ndarray:
    """uint32 hash of every word n-gram (one shingle of all words for texts shorter than n).

    `lower_word_hashes` (`text_word_hashes(text.lower().encode())[0]`) may be passed when known.
    """
    if lower_word_hashes is None:
        lower_word_hashes = text_word_hashes(text.lower().encode("utf-8", "surrogatepass"))[0]
    hashes = lower_word_hashes
    if len(hashes) == 0:
        hashes = np.array([word_hash(b"")], dtype=np.uint64)  # an empty text: one empty shingle
    grams = ngram_hashes(hashes, min(ngram, len(hashes)))
    return (grams >> np.uint64(32)).astype(np.uint32)


def shingle_hash32(shingle: bytes) -> int:
    """The same shingle hash for one shingle given as space-joined words (datasketch's hashfunc)."""
    return ngram_hash_of_words(shingle.split(b" ")) >> 32


def fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser: a bijection that spreads every input bit over the output."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """MinHash signatures of `num_perm` uint32 minima over word n-gram shingles."""

    def __init__(self, num_perm: int = 128, seed: int = 1, ngram: int = 5):
        self.num_perm, self.ngram = num_perm, ngram
        # The permutations of datasketch's affine32 scheme: a odd, b any 32-bit value.
        gen = np.random.RandomState(seed)
        self.a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        self.b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def signatures(self, texts: list[str]) -> np.ndarray:
        """(len(texts), num_perm) uint32 signatures."""
        return self.signatures_from_shingles([shingle_hashes(t, self.ngram) for t in texts])

    def signatures_from_shingles(self, shingles: list[np.ndarray]) -> np.ndarray:
        out = np.empty((len(shingles), self.num_perm), dtype=np.uint32)
        if not shingles:
            return out
        counts = np.array([len(s) for s in shingles])
        mixed = fmix32(np.concatenate(shingles))
        ends = np.cumsum(counts)
        a, b = self.a[:, None], self.b[:, None]
        first = 0
        while first < len(shingles):
            # Take whole documents until the block holds about _BATCH_SHINGLES shingles; the block
            # is (num_perm, shingles) so each permutation streams through contiguous memory.
            start = ends[first] - counts[first]
            last = max(first + 1, int(np.searchsorted(ends, start + _BATCH_SHINGLES, side="right")))
            block = a * mixed[None, start : ends[last - 1]]  # wraps mod 2**32
            block += b
            offsets = ends[first:last] - counts[first:last] - start
            out[first:last] = np.minimum.reduceat(block, offsets, axis=1).T
            first = last
        return out


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Share of equal signature entries (row-wise for 2-D inputs)."""
    return (a == b).mean(axis=-1)


def lsh_pairs(signatures: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """(k, 2) index pairs (earlier, later) that share a band bucket and whose estimated Jaccard
    is >= threshold (threshold 0 returns every candidate pair the banding finds).

    Within a bucket each document is paired with the bucket's earliest member only; a pair
    missed that way in one band is usually found in another.
    """
    n, num_perm = signatures.shape
    rows = num_perm // bands
    weights = np.uint64(0x9E3779B97F4A7C15) ** np.arange(rows, dtype=np.uint64)
    found = []
    for band in range(bands):
        block = signatures[:, band * rows : (band + 1) * rows].astype(np.uint64)
        with np.errstate(over="ignore"):
            keys = (block * weights).sum(axis=1)  # one 64-bit key per document and band
        order = np.argsort(keys, kind="stable")  # stable: within a bucket, earliest first
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        heads = np.repeat(order[starts], np.diff(np.r_[starts, n]))
        pairs = np.stack([heads, order], axis=1)[heads != order]
        if len(pairs):
            found.append(pairs)
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.unique(np.concatenate(found), axis=0)
    keep = estimated_jaccard(signatures[pairs[:, 0]], signatures[pairs[:, 1]]) >= threshold
    return pairs[keep]


def near_duplicates(signatures: np.ndarray, bands: int, threshold: float) -> np.ndarray:
    """For each document, the index of the earlier document it duplicates, or -1 if it is kept.

    Documents connected by verified candidate pairs form clusters; each cluster keeps its
    earliest document.
    """
    n = len(signatures)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in lsh_pairs(signatures, bands, threshold).tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n)], dtype=np.int64)
    return np.where(roots == np.arange(n), -1, roots)


def candidate_probability(jaccard: float, bands: int, rows: int) -> float:
    """The LSH S-curve: chance that two documents of this Jaccard share at least one band."""
    return 1.0 - (1.0 - jaccard**rows) ** bands
