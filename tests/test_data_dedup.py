"""Deduplication against independent truths: datasketch's MinHash and exact Jaccard similarity."""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash

from lmforge.data.dedup import (
    MinHasher,
    candidate_probability,
    estimated_jaccard,
    exact_key,
    lsh_pairs,
    near_duplicates,
    shingle_hash32,
    shingle_words,
)
from lmforge.data.ngrams import ngram_hash_of_words, ngram_hashes, text_word_hashes, word_hash

NGRAM = 5


def shingle_set(text: str) -> set[tuple[str, ...]]:
    w = shingle_words(text)
    return {tuple(w[i : i + NGRAM]) for i in range(len(w) - NGRAM + 1)}


def jaccard(a: str, b: str) -> float:
    sa, sb = shingle_set(a), shingle_set(b)
    return len(sa & sb) / len(sa | sb)


def labelled_pairs(seed: int = 0, n_bases: int = 60):
    """Base documents and edited variants spanning Jaccard 0.2 .. 1.0, with their exact Jaccard."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(4000)]
    docs, pairs = [], []
    for _ in range(n_bases):
        base = [rng.choice(vocab) for _ in range(rng.randint(150, 300))]
        b = len(docs)
        docs.append(" ".join(base))
        for edits in (1, 2, 4, 6, 10, 16, 30):
            variant = list(base)
            for i in rng.sample(range(len(variant)), edits):
                variant[i] = rng.choice(vocab)
            docs.append(" ".join(variant))
            pairs.append((b, len(docs) - 1))
    truth = np.array([jaccard(docs[i], docs[j]) for i, j in pairs])
    return docs, pairs, truth


def test_vectorised_hashes_match_the_scalar_definition():
    rng = random.Random(0)
    alphabet = "ab\u00e9\u4e2d\U0001f600 \t\n\r\x0b\x0c,.\u00a0"
    for _ in range(50):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        data = text.encode()
        hashes, lengths = text_word_hashes(data)
        words = data.split()  # bytes.split(): the word definition
        assert hashes.tolist() == [word_hash(w) for w in words]
        assert lengths.tolist() == [len(w) for w in words]
        grams = ngram_hashes(hashes, 3)
        assert grams.tolist() == [ngram_hash_of_words(words[i : i + 3]) for i in range(len(words) - 2)]


def test_signatures_equal_datasketch_with_the_same_permutations():
    docs, _, _ = labelled_pairs(n_bases=5)
    docs += ["short text", ""]  # fewer words than the shingle size
    ours = MinHasher(num_perm=64, seed=7, ngram=NGRAM).signatures(docs)
    for text, sig in zip(docs, ours):
        words = shingle_words(text) or [b""]
        n = min(NGRAM, len(words))
        shingles = [b" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]
        ref = MinHash(num_perm=64, seed=7, hashfunc=shingle_hash32)
        ref.update_batch(shingles)
        assert np.array_equal(sig, ref.hashvalues)


def test_minhash_estimates_exact_jaccard():
    docs, pairs, truth = labelled_pairs()
    sigs = MinHasher(num_perm=128, ngram=NGRAM).signatures(docs)
    i, j = np.array(pairs).T
    estimate = estimated_jaccard(sigs[i], sigs[j])
    # The estimate is a mean of 128 Bernoulli(J) draws: standard error <= 0.5 / sqrt(128) = 0.044.
    assert np.abs(estimate - truth).mean() < 0.04
    assert np.abs(estimate - truth).max() < 0.2


def test_lsh_precision_and_recall_follow_the_s_curve():
    docs, pairs, truth = labelled_pairs()
    bands, threshold = 16, 0.8
    sigs = MinHasher(num_perm=128, ngram=NGRAM).signatures(docs)
    found = {tuple(p) for p in lsh_pairs(sigs, bands, threshold).tolist()}
    predicted = np.array([p in found for p in pairs])
    positive = truth >= threshold
    # Pairs far above the threshold are found (the S-curve is ~1 there); far below, never kept.
    assert predicted[truth >= 0.9].mean() >= 0.97
    assert not predicted[truth <= 0.65].any()
    precision = (predicted & positive).sum() / predicted.sum()
    recall = (predicted & positive).sum() / positive.sum()
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)

    # Before verification, the share of pairs that become candidates matches 1 - (1 - J^r)^b.
    candidates = {tuple(p) for p in lsh_pairs(sigs, bands, 0.0).tolist()}
    got = np.array([p in candidates for p in pairs])
    expected = np.array([candidate_probability(t, bands, 128 // bands) for t in truth])
    sd = np.sqrt((expected * (1 - expected)).sum())
    assert abs(got.sum() - expected.sum()) <= 4 * sd + 3


def test_near_duplicates_keep_the_earliest_of_each_cluster():
    docs, pairs, truth = labelled_pairs(n_bases=3)
    sigs = MinHasher(ngram=NGRAM).signatures(docs)
    dup_of = near_duplicates(sigs, bands=16, threshold=0.8)
    for (base, variant), t in zip(pairs, truth):
        assert dup_of[base] == -1  # bases are unrelated to each other and come first
        if t >= 0.9:
            assert dup_of[variant] == base
        if t <= 0.65:
            assert dup_of[variant] == -1


def test_exact_key_ignores_case_and_whitespace_only():
    assert exact_key("Hello  world\n") == exact_key("hello world")
    assert exact_key("hello world") != exact_key("hello, world")
