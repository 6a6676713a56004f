"""Data curation: raw sources -> clean -> quality filters -> dedup -> decontamination -> token shards.

Each step is one module, in pipeline order:

    sources.py   files, directories, globs, JSONL, Parquet, gzip, `builtin:default` -> Document
    builtin.py   the built-in corpus (Shakespeare, World English Bible, Python stdlib sources)
    clean.py     Unicode normalisation, control characters, whitespace
    filters.py   Gopher/C4-style quality heuristics, separate rules for code
    dedup.py     exact (normalised hash) and near (MinHash + LSH) deduplication
    decontam.py  n-gram overlap with reference texts
    prepare.py   the pipeline: `curate()` and `prepare()`, the stats table, resumability
    shards.py    the binary shard format: writer and validating reader
    loader.py    `TokenLoader`: memory-mapped, seeded, rank-disjoint, resumable batches
"""

from __future__ import annotations

from lmforge.data.sources import Document

__all__ = ["Document"]
