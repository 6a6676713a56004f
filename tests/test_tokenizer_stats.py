"""`tokenizer_stats` against an independent encoder (Hugging Face tokenizers on our export) and
the vocabulary as Hugging Face sees it."""

from __future__ import annotations

from collections import Counter

import pytest

from lmforge.tokenizer import export_hf, train_tokenizer
from lmforge.tokenizer.stats import tokenizer_stats

TRAIN = ["def f(x):\n        return x + 1\n" * 30, "the quick brown fox jumps over the lazy dog. " * 30,
         "une phrase en français, déjà vue. " * 20]
HELD_OUT = ["the lazy fox returns x", "        déjà   vu\n", "brown dogs jump over f(x)"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TRAIN, vocab_size=340, workers=1)


def test_stats_agree_with_hugging_face(tok, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(export_hf(tok, tmp_path) / "tokenizer.json"))
    hf_ids = [hf.encode(t, add_special_tokens=False).ids for t in HELD_OUT]
    uses = Counter(i for ids in hf_ids for i in ids)
    n_bytes = sum(len(t.encode()) for t in HELD_OUT)

    s = tokenizer_stats(tok, HELD_OUT, longest=5)
    assert s["val_tokens"] == sum(map(len, hf_ids))
    assert s["val_bytes_per_token"] == pytest.approx(n_bytes / s["val_tokens"])
    assert s["regular_tokens_used"] == len(uses)
    regular = hf.get_vocab_size() - len(tok.special_tokens)
    assert s["regular_tokens_used_share"] == pytest.approx(len(uses) / regular)

    # The longest tokens: by length of their bytes (HF's byte-level decode), whitespace runs left out.
    lengths = {i: len(hf.decode([i]).encode()) for i in range(regular)
               if hf.decode([i]).strip() and "\ufffd" not in hf.decode([i])}
    longest = s["longest_tokens"]
    assert [t["bytes"] for t in longest] == sorted((t["bytes"] for t in longest), reverse=True)
    assert longest[0]["bytes"] == max(lengths.values())
    assert all(t["text"].strip() for t in longest)
    assert all(t["uses"] == uses[t["id"]] for t in longest)
    spaces = [len(hf.decode([i]).encode()) for i in range(regular) if not hf.decode([i]).strip()]
    assert s["longest_whitespace_token"] == max(spaces)


def test_reading_stops_at_max_bytes(tok):
    texts = ["the fox " * 10] * 100  # 80 bytes each
    assert tokenizer_stats(tok, texts, max_bytes=200)["val_bytes"] == 240
    assert tokenizer_stats(tok, [])["val_bytes_per_token"] is None
