"""Byte-level BPE training: count pre-split chunks, then merge the most frequent pair, repeatedly.

Two phases, each built for a corpus larger than memory and for both cores:

1. **Counting.** Text streams in (any iterable of str: files, JSONL fields, the data stage's corpus)
   and is cut by the split regex into chunks ("words"); merges never cross a chunk boundary, so
   only the multiset of distinct chunks matters. Worker processes each count their share of the
   batches into a `Counter`; a bounded queue keeps memory flat however large the input is.

2. **Merging.** Each distinct chunk is held as a `str` whose characters are token ids
   (`chr(id)`), so merging a pair inside a chunk is one C-speed `str.replace` (left-to-right,
   non-overlapping: exactly BPE's rule). Pair counts live in a dict, the next best pair comes
   from a lazy max-heap, and an index `pair -> chunks containing it` means each merge touches only
   the chunks it changes, never the whole table. Most of those chunks hold the pair once; they are
   just grouped by their neighbouring token, and the neighbour pairs' counts move once per group.

Tie-break (documented, deterministic): the pair with the highest count wins; among equal counts
the pair with the smallest (left id, right id) wins. A pair whose merged bytes already form a token
is never merged (every token's bytes are unique, as tiktoken's rank table requires).
`lmforge.tokenizer.reference.naive_train` is the obvious O(n^2) version of the same rule; the
tests check both learn identical merges.
"""

from __future__ import annotations

import gc
import heapq
import multiprocessing as mp
import operator
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import regex

from lmforge.config import DEFAULT_SPECIAL_TOKENS, GPT4_SPLIT_PATTERN, TokenizerConfig
from lmforge.tokenizer.tokenizer import Tokenizer

# Text is sent to counting workers in batches of about this many characters: large enough that
# inter-process overhead is small (well under 1 ms a batch), small enough that memory stays flat
# and that the workers finish together (the last batch keeps one worker busy alone).
BATCH_CHARS = 1 << 18


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = GPT4_SPLIT_PATTERN,
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    workers: int | None = None,
    progress: bool | None = None,
) -> Tokenizer:
    """Learn a byte-level BPE tokenizer of `vocab_size` tokens (256 bytes + merges + specials).

    `workers` processes count chunks (default: all cores); `progress` shows tqdm bars (default:
    when stderr is a terminal). If the corpus runs out of pairs, fewer merges are learned and the
    vocabulary is smaller than asked; the special tokens always come right after the merges.
    """
    special_tokens = list(special_tokens)
    TokenizerConfig(vocab_size=vocab_size, pattern=pattern, special_tokens=special_tokens).validate()
    compiled = compile_pattern(pattern)
    if progress is None:
        progress = sys.stderr.isatty()
    counts = count_chunks(texts, compiled.pattern, workers=workers, progress=progress)
    num_merges = vocab_size - 256 - len(special_tokens)
    merges = learn_merges(counts, num_merges, progress=progress)
    first_special = 256 + len(merges)
    specials = {tok: first_special + i for i, tok in enumerate(special_tokens)}
    return Tokenizer(merges, pattern, specials)


def compile_pattern(pattern: str) -> regex.Pattern:
    from lmforge.errors import ConfigError

    try:
        return regex.compile(pattern)
    except regex.error as e:
        raise ConfigError(f"tokenizer.pattern is not a valid regex: {e}") from None


# --------------------------------------------------------------------------------------------
# Phase 1: count chunks.


def count_chunks(
    texts: Iterable[str],
    pattern: str,
    workers: int | None = None,
    progress: bool = False,
) -> Counter[str]:
    """How often each pre-split chunk occurs in `texts`, counted by `workers` processes."""
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    bar = tqdm(desc="counting chunks", unit="char", unit_scale=True, disable=not progress)
    batches = _batches(texts, bar)
    first = next(batches, None)
    second = next(batches, None)
    if first is None:
        bar.close()
        return Counter()
    if second is None or workers == 1:
        # Small input (or one worker): counting here beats starting processes.
        counts: Counter[str] = Counter()
        compiled = regex.compile(pattern)
        for batch in _chain(first, second, batches):
            _count_into(counts, compiled, batch)
        bar.close()
        return counts
    counts = _count_in_processes(_chain(first, second, batches), pattern, workers)
    bar.close()
    return counts


def _chain(first: list[str], second: list[str] | None, rest: Iterator[list[str]]) -> Iterator[list[str]]:
    yield first
    if second is not None:
        yield second
        yield from rest


def _batches(texts: Iterable[str], bar) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= BATCH_CHARS:
            bar.update(size)
            yield batch
            batch, size = [], 0
    if batch:
        bar.update(size)
        yield batch


def _count_into(counts: Counter[str], compiled: regex.Pattern, batch: list[str]) -> None:
    findall = compiled.findall
    for text in batch:
        counts.update(findall(text))


def _count_worker(pattern: str, inbox, outbox) -> None:
    """Count every batch from `inbox` until a None arrives, then send the total once."""
    compiled = regex.compile(pattern)
    counts: Counter[str] = Counter()
    while (batch := inbox.get()) is not None:
        _count_into(counts, compiled, batch)
    outbox.put(dict(counts))


def _count_in_processes(batches: Iterator[list[str]], pattern: str, workers: int) -> Counter[str]:
    # fork where the OS has it (no re-import); spawn elsewhere.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    inbox = ctx.Queue(maxsize=2 * workers)  # bounded: the reader waits for slow counters
    outbox = ctx.Queue()
    procs = [ctx.Process(target=_count_worker, args=(pattern, inbox, outbox), daemon=True)
             for _ in range(workers)]
    for p in procs:
        p.start()
    try:
        for batch in batches:
            inbox.put(batch)
        for _ in procs:
            inbox.put(None)
        partials = [outbox.get() for _ in procs]
        for p in procs:
            p.join()
    except BaseException:
        inbox.cancel_join_thread()  # do not block exit flushing batches nobody will read
        for p in procs:
            p.terminate()
        raise
    # Merge the partial counts, largest first (one dict update per smaller table).
    partials.sort(key=len, reverse=True)
    total = Counter(partials[0])
    for part in partials[1:]:
        total.update(part)
    return total


# --------------------------------------------------------------------------------------------
# Phase 2: merge.


def learn_merges(
    chunk_counts: dict[str, int], num_merges: int, progress: bool = False
) -> list[tuple[int, int]]:
    """Learn up to `num_merges` merges from chunk counts; returns (left id, right id) pairs.

    Merge i creates token id 256 + i.
    """
    # The merge tables are about a million small lists and ints with no reference cycles, which
    # the cyclic garbage collector would scan again and again as they grow. It stays paused until
    # they are freed, on return from `_learn_merges`.
    with _gc_paused():
        return _learn_merges(chunk_counts, num_merges, progress)


def _learn_merges(chunk_counts: dict[str, int], num_merges: int, progress: bool) -> list[tuple[int, int]]:
    from tqdm import tqdm

    # A chunk as a str of token ids: its UTF-8 bytes read as latin-1 give chr(byte) per byte.
    # (surrogatepass: a lone surrogate from a Python str counts as its 3 bytes instead of failing.)
    words = [chunk.encode("utf-8", "surrogatepass").decode("latin-1") for chunk in chunk_counts]
    weights = list(chunk_counts.values())
    token_bytes = {chr(i): bytes([i]) for i in range(256)}
    known_bytes = set(token_bytes.values())

    # The index pair -> chunks holding it (a chunk listed once per occurrence), and pair counts
    # as the summed weights of those chunks. A pair is a 2-char str.
    where: dict[str, list[int]] = defaultdict(list)
    for i, word in enumerate(words):
        for pair in map(operator.add, word, word[1:]):
            where[pair].append(i)
    pair_counts: dict[str, int] = defaultdict(int)
    for pair, chunks in where.items():
        pair_counts[pair] = sum(map(weights.__getitem__, chunks))
    heap = [_heap_entry(count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=num_merges, desc="merging", unit="merge", disable=not progress)
    while len(merges) < num_merges and heap:
        filed_count, pair = _heap_pair(heapq.heappop(heap))
        count = pair_counts[pair]
        if count != filed_count:
            # Stale entry: counts of existing pairs only ever fall, so re-file it lower.
            if count > 0:
                heapq.heappush(heap, _heap_entry(count, pair))
            continue
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        if merged in known_bytes:
            continue  # these bytes are already a token: never merge this pair
        new = chr(256 + len(merges))
        merges.append((ord(pair[0]), ord(pair[1])))
        token_bytes[new] = merged
        known_bytes.add(merged)
        _apply_merge(pair, new, words, weights, pair_counts, where, heap)
        bar.update(1)
    bar.close()
    return merges


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, then restore its previous state."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# The heap is a min-heap of ints that sort like (-count, left id, right id): the most frequent
# pair comes first, and among equal counts the smaller (left, right) ids (the tie-break). One
# int compares faster than a tuple. Every token id is a code point, so it fits in 21 bits.
_ID_BITS = 21
_ID_MASK = (1 << _ID_BITS) - 1


def _heap_entry(count: int, pair: str) -> int:
    return (-count << 2 * _ID_BITS) | (ord(pair[0]) << _ID_BITS) | ord(pair[1])


def _heap_pair(entry: int) -> tuple[int, str]:
    """(count, pair) back from `_heap_entry`."""
    return -(entry >> 2 * _ID_BITS), chr(entry >> _ID_BITS & _ID_MASK) + chr(entry & _ID_MASK)


def _apply_merge(pair: str, new: str, words: list[str], weights: list[int],
                 pair_counts: dict[str, int], where: dict[str, list[int]], heap: list) -> None:
    """Replace `pair` by `new` in every chunk containing it, updating counts and the index.

    Only pairs touching an occurrence change: the pair itself and its left and right neighbours
    go away, and pairs with the new token appear. Most chunks hold the pair exactly once, and
    there a chunk "x a b y" merging (a, b) turns (x, a) into (x, new) and (b, y) into (new, y):
    the loop only files the chunk under its neighbours x and y, and the counts then move once
    per neighbour token, by the summed weight of its chunks. Chunks holding the pair more than
    once go through `_merge_repeated`.
    """
    a, b = pair
    before: dict[str, list[int]] = defaultdict(list)  # x -> chunks holding "x a b" once
    after: dict[str, list[int]] = defaultdict(list)  # y -> chunks holding "a b y" once
    created: set[str] = set()
    for i in where.pop(pair):
        word = words[i]
        at = word.find(pair)
        if at < 0:
            continue  # stale entry: consumed by an earlier merge, or by an earlier visit here
        merged = word.replace(pair, new)  # left to right, non-overlapping: BPE's rule
        words[i] = merged
        if len(merged) < len(word) - 1:
            _merge_repeated(i, word, merged, pair, new, weights[i], pair_counts, where, created)
        else:
            if at > 0:
                before[word[at - 1]].append(i)
            if at + 2 < len(word):
                after[word[at + 2]].append(i)
    # (lost pair, formed pair, chunks) per neighbour token.
    moves = [(x + a, x + new, chunks) for x, chunks in before.items()]
    moves += [(b + y, new + y, chunks) for y, chunks in after.items()]
    for lost, formed, chunks in moves:
        weight = sum(map(weights.__getitem__, chunks))
        pair_counts[lost] -= weight
        pair_counts[formed] += weight
        where[formed].extend(chunks)
        created.add(formed)
    # Every occurrence is gone (str.replace leaves none), and so is every overlap with a
    # neighbour such as the right (a, a) in "a a a", subtracted just above.
    pair_counts[pair] = 0
    # Only pairs with the new token gained count: file them in the heap.
    for p in created:
        heapq.heappush(heap, _heap_entry(pair_counts[p], p))


def _merge_repeated(i: int, word: str, merged: str, pair: str, new: str, weight: int,
                    pair_counts: dict[str, int], where: dict[str, list[int]],
                    created: set[str]) -> None:
    """Counts and index for chunk `i`, which held `pair` more than once: `word` became `merged`.

    Two back-to-back occurrences share one neighbour pair, counted once, and (new, new) is
    counted once, from its left. The caller resets the count of `pair` itself.
    """
    at = word.find(pair)
    end = -1  # where the previous occurrence ended
    while at >= 0:
        if at > 0 and at != end:
            pair_counts[word[at - 1 : at + 1]] -= weight
        if at + 2 < len(word):
            pair_counts[word[at + 1 : at + 3]] -= weight
        end = at + 2
        at = word.find(pair, end)
    formed = []  # pairs with the new token, one per occurrence
    at = merged.find(new)
    while at >= 0:
        if at > 0 and merged[at - 1] != new:
            formed.append(merged[at - 1 : at + 1])
        if at + 1 < len(merged):
            formed.append(merged[at : at + 2])
        at = merged.find(new, at + 1)
    for p in formed:
        pair_counts[p] += weight
        where[p].append(i)
    created.update(formed)
