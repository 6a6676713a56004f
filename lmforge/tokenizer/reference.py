"""Readable reference versions of BPE training and encoding: the truth the fast paths are tested against.

Nothing here is fast, and nothing here needs to be: every line follows the definition.

Encoding rule (the one tiktoken implements, so the fast path can be tiktoken itself):
  1. Cut the text at allowed special tokens; each special becomes its id.
  2. Split the rest with the pattern into chunks and take each chunk's UTF-8 bytes.
  3. If a chunk's bytes are a token, that token is the answer.
  4. Otherwise start from single bytes and repeatedly merge the adjacent pair whose joined bytes
     form the token of lowest id (the leftmost such pair on a tie), until no pair forms a token.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import regex


def encode_chunk(chunk: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Token ids of one pre-split chunk under the rank rule above (steps 3 and 4)."""
    if chunk in ranks:
        return [ranks[chunk]]
    parts = [bytes([b]) for b in chunk]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[p] for p in parts]


def encode(
    text: str,
    pattern: str,
    ranks: dict[bytes, int],
    special_tokens: dict[str, int],
    allowed_special: Iterable[str] = (),
) -> list[int]:
    """Token ids of `text`; special tokens in `allowed_special` become their ids, others are text.

    Lone surrogates (not encodable as UTF-8) become U+FFFD first, as tiktoken does.
    """
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    allowed = sorted(set(allowed_special), key=len, reverse=True)  # longest first at one position
    pieces = [text]
    if allowed:
        splitter = "(" + "|".join(regex.escape(s) for s in allowed) + ")"
        pieces = regex.split(splitter, text)  # odd positions hold the specials
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        if i % 2:
            ids.append(special_tokens[piece])
            continue
        for chunk in regex.findall(pattern, piece):
            ids.extend(encode_chunk(chunk.encode("utf-8"), ranks))
    return ids


def naive_train(texts: Iterable[str], pattern: str, num_merges: int) -> list[tuple[int, int]]:
    """The obvious BPE trainer: recount every pair after every merge. O(merges x corpus).

    Same rule as `lmforge.tokenizer.train.learn_merges`: the most frequent pair wins, ties go to
    the smallest (left id, right id), and a pair whose joined bytes are already a token is skipped.
    """
    chunk_counts = Counter(c for t in texts for c in regex.findall(pattern, t))
    words = [(list(chunk.encode("utf-8")), n) for chunk, n in chunk_counts.items()]
    vocab = {i: bytes([i]) for i in range(256)}
    merges: list[tuple[int, int]] = []
    while len(merges) < num_merges:
        pair_counts: Counter[tuple[int, int]] = Counter()
        for ids, n in words:
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] += n
        candidates = [p for p in pair_counts if vocab[p[0]] + vocab[p[1]] not in vocab.values()]
        if not candidates:
            break
        best = min(candidates, key=lambda p: (-pair_counts[p], p))
        new_id = 256 + len(merges)
        merges.append(best)
        vocab[new_id] = vocab[best[0]] + vocab[best[1]]
        for ids, _ in words:
            i = 0
            while i < len(ids) - 1:
                if (ids[i], ids[i + 1]) == best:
                    ids[i : i + 2] = [new_id]
                i += 1
    return merges
