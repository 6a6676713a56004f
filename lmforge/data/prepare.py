"""The data pipeline: curate (read, clean, filter, dedup, decontaminate, split), then tokenize into shards.

    curate(cfg.data, out)      -> OUT/curated/{train,val}.jsonl + stats.json   (no tokenizer needed)
    prepare(cfg, out, tok_dir) -> OUT/tokenizer/, OUT/{train,val}_NNNNNN.bin, OUT/manifest.json

`curate` is usable on its own: `lmforge run` curates, trains a tokenizer on
`curated_texts(out, "train")`, then tokenizes. Both steps are resumable. Curation is keyed by a
hash of its inputs (paths, sizes, mtimes, pinned archives) and of the data config; a finished
curation with the same key is reused. Tokenization writes each shard atomically and records after
each one where the next starts (`progress.json`), so an interrupted run keeps its finished shards
and continues from there.

Pass 1 (in `data.workers` processes) cleans each document, applies the quality rules and computes
what dedup, decontamination and the split need (exact key, MinHash signature, reference overlaps,
split hash); survivors go to a scratch file. The main process then finds exact and near
duplicates, and pass 2 writes the kept documents to the curated split files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from lmforge.atomic import atomic_directory, atomic_write_json
from lmforge.config import DataConfig, RunConfig
from lmforge.data.builtin import builtin_description
from lmforge.data.clean import clean_text
from lmforge.data.decontam import Decontaminator, reference_fingerprint
from lmforge.data.dedup import MinHasher, exact_key, near_duplicates, shingle_hashes
from lmforge.data.filters import RULES, quality_problem
from lmforge.data.ngrams import text_word_hashes
from lmforge.data.shards import token_dtype, write_shard
from lmforge.data.sources import (
    Document,
    ReadReport,
    file_fingerprint,
    input_bytes,
    iter_documents,
)
from lmforge.errors import UserError

T = TypeVar("T")
# Bytes of text per token assumed when the validation split is sized before the tokenizer exists:
# generous (English under a few-thousand-token BPE is about 3-4.5; a small, repetitive corpus
# can reach 5), so one evaluation batch fits.
VAL_BYTES_PER_TOKEN = 6
MANIFEST_FORMAT = "lmforge-shards"
MANIFEST_VERSION = 1
SPLITS = ("train", "val")
_BATCH_DOCS = 64  # documents per task sent to a worker
_SNIPPET = 80  # characters of a removed document shown as an example


# --------------------------------------------------------------------------------------------
# Stats: what each stage kept and removed.


@dataclass
class Stage:
    name: str
    removed_docs: int = 0
    removed_bytes: int = 0
    examples: list[dict] = field(default_factory=list)

    def remove(self, doc_id: str, nbytes: int, limit: int, **detail: Any) -> None:
        self.removed_docs += 1
        self.removed_bytes += nbytes
        if len(self.examples) < limit:
            self.examples.append({"id": doc_id, **detail})


def format_table(stats: dict) -> str:
    """The stage table printed at the end of `data prepare`."""
    rows = [("read", stats["read"]["documents"], stats["read"]["bytes"], "", "")]
    docs, nbytes = stats["read"]["documents"], stats["read"]["bytes"]
    for stage in stats["stages"]:
        docs -= stage["removed_docs"]
        nbytes -= stage["removed_bytes"]
        rows.append((stage["name"], docs, nbytes, f"-{stage['removed_docs']:,}",
                     f"-{_human(stage['removed_bytes'])}"))
    header = ("stage", "docs kept", "bytes kept", "docs removed", "bytes removed")
    cells = [header] + [(r[0], f"{r[1]:,}", _human(r[2]), r[3], r[4]) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(5)]
    lines = ["  ".join(c[i].ljust(widths[i]) if i == 0 else c[i].rjust(widths[i]) for i in range(5))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for split in SPLITS:
        s = stats["splits"][split]
        lines.append(f"{split}: {s['documents']:,} documents, {_human(s['bytes'])}")
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Pass 1, in worker processes: everything that looks at one document alone.

_worker: dict[str, Any] = {}


def _init_worker(cfg: DataConfig, decontaminator: Decontaminator | None) -> None:
    _worker["cfg"] = cfg
    _worker["minhash"] = MinHasher(cfg.dedup.num_perm, cfg.dedup.seed, cfg.dedup.ngram)
    _worker["decontam"] = decontaminator


def _examine(docs: list[Document]) -> list[dict]:
    """Clean, filter and fingerprint a batch of documents."""
    cfg: DataConfig = _worker["cfg"]
    results, survivors = [], []
    minhash: MinHasher = _worker["minhash"]
    for doc in docs:
        text = clean_text(doc.text, cfg.unicode_form)
        r: dict[str, Any] = {"doc": dataclasses.replace(doc, text=text),
                             "raw_bytes": len(doc.text.encode("utf-8", "replace")),
                             "bytes": len(text.encode("utf-8", "replace"))}
        # Hashes of the lower-cased words, shared by the n-gram filters and MinHash.
        lower_words = text_word_hashes(text.lower().encode("utf-8", "surrogatepass"))
        r["problem"] = (("empty", 0) if not text
                        else quality_problem(text, doc.kind, cfg.filters, lower_words))
        if r["problem"] is None:
            r["key"] = exact_key(text)
            digest = hashlib.blake2b(text.encode("utf-8", "replace"), digest_size=8).digest()
            r["split_u"] = int.from_bytes(digest, "little") / 2.0**64
            if _worker["decontam"] is not None:
                r["overlaps"] = _worker["decontam"].overlaps(text)
                if r["overlaps"]:  # which references (benchmarks), for the report
                    r["references"] = _worker["decontam"].matched(text)
            if cfg.dedup.near:
                r["shingles"] = shingle_hashes(text, minhash.ngram, lower_words[0])
            survivors.append(r)
        results.append(r)
    if cfg.dedup.near and survivors:
        sigs = minhash.signatures_from_shingles([r.pop("shingles") for r in survivors])
        for r, sig in zip(survivors, sigs):
            r["signature"] = sig
    return results


def _batches(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------
# Curation.


def curate_key(cfg: DataConfig) -> str:
    """Hash of everything the curated corpus depends on: inputs and config (not worker count)."""
    config = dataclasses.asdict(cfg)
    config.pop("workers")
    inputs: dict[str, Any] = {s: file_fingerprint(s) for s in cfg.sources}
    inputs.update({s: reference_fingerprint(s) for s in cfg.decontam.references})
    if any(s.startswith("builtin:") for s in cfg.sources):
        inputs["builtin"] = builtin_description(cfg.builtin_code_max_bytes)
    payload = json.dumps({"version": MANIFEST_VERSION, "config": config, "inputs": inputs},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def curated_texts(out_dir: str | Path, split: str = "train") -> Iterator[str]:
    """The texts of a curated split, in order (what the tokenizer is trained on)."""
    path = Path(out_dir) / "curated" / f"{split}.jsonl"
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


def curate(cfg: DataConfig, out_dir: str | Path, progress: bool | None = None) -> dict:
    """Read, clean, filter, dedup, decontaminate and split into OUT/curated; returns the stats.

    A finished curation of the same inputs and config is reused. Raises UserError when nothing
    is left to train on.
    """
    out_dir = Path(out_dir)
    final = out_dir / "curated"
    key = curate_key(cfg)
    stats_path = final / "stats.json"
    if stats_path.is_file():
        stats = json.loads(stats_path.read_text(encoding="utf-8"))
        if stats.get("key") == key:
            stats["resumed"] = True
            return stats
    progress = sys.stderr.isatty() if progress is None else progress
    decontaminator = (Decontaminator(cfg.decontam.references, cfg.decontam.ngram, cfg.text_field)
                      if cfg.decontam.references else None)
    report = ReadReport()
    docs = iter_documents(cfg.sources, cfg.text_field, cfg.strict, report, cfg.builtin_code_max_bytes)
    limit = cfg.filters.examples
    cleaning, empty = Stage("clean"), Stage("empty after cleaning")
    rules: dict[str, Stage] = {}
    exact, near = Stage("exact dedup"), Stage("near dedup")
    decontam = Stage(f"decontam ({cfg.decontam.action})")
    seen: dict[bytes, str] = {}
    kept: list[dict] = []  # per surviving document: id, bytes, split_u, overlaps
    signatures: list[np.ndarray] = []

    with atomic_directory(final, overwrite=True) as tmp:
        scratch_path = tmp / "candidates.jsonl"
        bar = tqdm(desc="curate", unit="B", unit_scale=True, disable=not progress,
                   total=input_bytes(cfg.sources) if progress else None)
        with open(scratch_path, "w", encoding="utf-8") as scratch:
            for r in _examine_all(docs, cfg, decontaminator):
                doc = r["doc"]
                bar.update(r["raw_bytes"])
                cleaning.removed_bytes += r["raw_bytes"] - r["bytes"]
                if r["problem"] is not None:
                    rule, value = r["problem"]
                    stage = empty if rule == "empty" else rules.setdefault(rule, Stage(f"filter {rule}"))
                    stage.remove(doc.id, r["bytes"], limit, value=value, text=doc.text[:_SNIPPET])
                    continue
                if cfg.dedup.exact:
                    first = seen.setdefault(r["key"], doc.id)
                    if first != doc.id:
                        exact.remove(doc.id, r["bytes"], limit, duplicate_of=first)
                        continue
                kept.append({"id": doc.id, "bytes": r["bytes"], "split_u": r["split_u"],
                             "overlaps": r.get("overlaps", 0), "references": r.get("references", [])})
                if cfg.dedup.near:
                    signatures.append(r["signature"])
                scratch.write(json.dumps({"id": doc.id, "source": doc.source, "kind": doc.kind,
                                          "text": doc.text}, ensure_ascii=False) + "\n")
        bar.close()

        duplicate_of = (near_duplicates(np.stack(signatures), cfg.dedup.bands, cfg.dedup.threshold)
                        if signatures else np.full(len(kept), -1))
        split_of, flagged = _assign_splits(kept, duplicate_of, cfg, near, decontam, limit)
        counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        outputs = {s: open(tmp / f"{s}.jsonl", "w", encoding="utf-8") for s in SPLITS}
        try:
            with open(scratch_path, encoding="utf-8") as scratch:
                for i, line in enumerate(scratch):
                    split = split_of[i]
                    if split is not None:
                        outputs[split].write(line)
                        counts[split]["documents"] += 1
                        counts[split]["bytes"] += kept[i]["bytes"]
        finally:
            for f in outputs.values():
                f.close()
        scratch_path.unlink()

        by_rule_order = [rules[r] for r in RULES if r in rules]
        stages = [cleaning, empty, *by_rule_order, exact, near, decontam]
        stats = {
            "key": key,
            "read": report.summary(),
            "stages": [dataclasses.asdict(s) for s in stages],
            "flagged": flagged,
            "splits": counts,
            "resumed": False,
        }
        if counts["train"]["documents"] == 0:
            raise UserError(
                f"nothing left to train on: all {report.documents} documents read from "
                f"{', '.join(cfg.sources)} were removed ("
                + ", ".join(f"{s.name}: {s.removed_docs}" for s in stages if s.removed_docs)
                + "); loosen data.filters or add data"
            )
        atomic_write_json(tmp / "stats.json", stats)
    return stats


def _examine_all(docs: Iterator[Document], cfg: DataConfig,
                 decontaminator: Decontaminator | None) -> Iterator[dict]:
    """Pass 1 over all documents, in order, in `cfg.workers` processes (inline for one)."""
    if cfg.workers == 1:
        _init_worker(cfg, decontaminator)
        for batch in _batches(docs, _BATCH_DOCS):
            yield from _examine(batch)
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ctx.Pool(cfg.workers, initializer=_init_worker, initargs=(cfg, decontaminator)) as pool:
        for results in pool.imap(_examine, _batches(docs, _BATCH_DOCS)):
            yield from results


def _assign_splits(kept: list[dict], duplicate_of: np.ndarray, cfg: DataConfig,
                   near: Stage, decontam: Stage, limit: int) -> tuple[list[str | None], list[str]]:
    """Per candidate: "train", "val" or None (removed by near dedup or decontamination)."""
    split_of: list[str | None] = []
    flagged: list[str] = []
    for i, doc in enumerate(kept):
        if duplicate_of[i] >= 0:
            near.remove(doc["id"], doc["bytes"], limit, duplicate_of=kept[duplicate_of[i]]["id"])
            split_of.append(None)
            continue
        if doc["overlaps"]:
            if cfg.decontam.action == "drop":
                decontam.remove(doc["id"], doc["bytes"], limit, overlapping_ngrams=doc["overlaps"],
                                references=doc["references"])
                split_of.append(None)
                continue
            flagged.append(doc["id"])
        split_of.append("val" if doc["split_u"] < cfg.val_fraction else "train")
    # A requested validation split is never empty when there are two documents to split, and
    # holds about data.val_min_tokens: train documents with the smallest split hash move over
    # (still deterministic), while val stays the smaller split.
    if cfg.val_fraction > 0:
        train = sorted((i for i, s in enumerate(split_of) if s == "train"), key=lambda i: kept[i]["split_u"])
        val_bytes = sum(kept[i]["bytes"] for i, s in enumerate(split_of) if s == "val")
        n_val = split_of.count("val")
        want = cfg.val_min_tokens * VAL_BYTES_PER_TOKEN
        moved = 0
        while moved < len(train) and (n_val == 0 or val_bytes < want) and n_val + 1 < len(train) - moved:
            split_of[train[moved]] = "val"
            val_bytes += kept[train[moved]]["bytes"]
            n_val, moved = n_val + 1, moved + 1
    return split_of, flagged


# --------------------------------------------------------------------------------------------
# Tokenization into shards.


def prepare(cfg: RunConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
            progress: bool | None = None) -> dict:
    """The whole data stage; returns the manifest (also written to OUT/manifest.json)."""
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    out_dir = Path(out_dir)
    progress = sys.stderr.isatty() if progress is None else progress
    clock = time.perf_counter()
    seconds: dict[str, float] = {}
    stats = curate(cfg.data, out_dir, progress)
    seconds["curate"], clock = time.perf_counter() - clock, time.perf_counter()
    tok_out = out_dir / "tokenizer"
    if tokenizer_dir is not None:
        tok = load_tokenizer(tokenizer_dir)
        if not (tok_out.exists() and Path(tokenizer_dir).resolve() == tok_out.resolve()):
            with atomic_directory(tok_out, overwrite=True) as tmp:
                tok.save(tmp)
        tokenizer_source = str(tokenizer_dir)
    else:
        tokenizer_source = "trained on the curated train split"
        wanted = _tokenizer_key(stats["key"], cfg)
        marker = tok_out / "trained_for.txt"
        if marker.is_file() and marker.read_text().strip() == wanted:
            tok = load_tokenizer(tok_out)
        else:
            tc = cfg.tokenizer
            tok = train_tokenizer(curated_texts(out_dir, "train"), tc.vocab_size, tc.split_pattern,
                                  tc.special_tokens, workers=cfg.data.workers, progress=progress)
            with atomic_directory(tok_out, overwrite=True) as tmp:
                tok.save(tmp)
                (tmp / "trained_for.txt").write_text(wanted + "\n")
    seconds["tokenizer"], clock = time.perf_counter() - clock, time.perf_counter()
    if "<|endoftext|>" not in tok.special_tokens:
        raise UserError(f"{tokenizer_source}: the tokenizer has no <|endoftext|> token to end documents")

    splits = {}
    for split in SPLITS:
        splits[split] = _tokenize_split(out_dir, split, tok, stats, cfg.data, progress)
    seconds["tokenize"] = time.perf_counter() - clock
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "key": stats["key"],
        "sources": cfg.data.sources,
        "builtin": (builtin_description(cfg.data.builtin_code_max_bytes)
                    if any(s.startswith("builtin:") for s in cfg.data.sources) else None),
        "config": dataclasses.asdict(cfg.data),
        "tokenizer": {"dir": "tokenizer", "source": tokenizer_source, "hash": tok.content_hash,
                      "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "dtype": token_dtype(tok.vocab_size).name,
        "read": stats["read"],
        "stages": stats["stages"],
        "flagged": stats["flagged"],
        "splits": splits,
        "resumed": stats["resumed"],
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    return manifest


def _tokenizer_key(curate_key: str, cfg: RunConfig) -> str:
    payload = json.dumps([curate_key, dataclasses.asdict(cfg.tokenizer)], sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _tokenize_split(out_dir: Path, split: str, tok: Any, stats: dict, cfg: DataConfig,
                    progress: bool) -> dict:
    """Tokenize one curated split into shards of `cfg.shard_tokens`, resuming finished shards.

    `progress_SPLIT.json` records after each shard the shards written so far and where the next
    one starts: a document index and a token offset inside that document.
    """
    key = hashlib.sha256(f"{stats['key']}|{tok.content_hash}|{cfg.shard_tokens}".encode()).hexdigest()
    state_path = out_dir / f"progress_{split}.json"
    state = {"key": key, "shards": [], "next_doc": 0, "next_offset": 0, "done": False}
    if state_path.is_file():
        saved = json.loads(state_path.read_text(encoding="utf-8"))
        if saved.get("key") == key and all((out_dir / s["file"]).is_file() for s in saved["shards"]):
            state = saved
    if not state["shards"]:  # starting afresh: stale shards of this split must not linger
        for old in out_dir.glob(f"{split}_*.bin"):
            old.unlink()
    if not state["done"]:
        total = stats["splits"][split]["bytes"]
        with tqdm(desc=f"tokenize {split}", unit="B", unit_scale=True, total=total,
                  disable=not progress) as bar:
            _write_shards(out_dir, split, tok, cfg.shard_tokens, cfg.workers, state, state_path, bar)
    return {"documents": stats["splits"][split]["documents"], "bytes": stats["splits"][split]["bytes"],
            "tokens": sum(s["tokens"] for s in state["shards"]), "shards": state["shards"]}


def _write_shards(out_dir: Path, split: str, tok: Any, shard_tokens: int, workers: int,
                  state: dict, state_path: Path, bar: tqdm) -> None:
    dtype = token_dtype(tok.vocab_size)
    eot = np.array([tok.eot_id], dtype=dtype)
    pending: list[np.ndarray] = []  # token arrays not yet in a shard
    pending_tokens = 0
    position = (state["next_doc"], state["next_offset"])  # where pending[0] starts
    texts = curated_texts(out_dir, split)
    for _ in range(state["next_doc"]):  # documents already complete in finished shards
        bar.update(len(next(texts).encode("utf-8")))
    skip = state["next_offset"]  # tokens of the next document already in a shard
    for batch in _batches(texts, 256):
        for text, ids in zip(batch, tok.encode_batch(batch, num_threads=workers)):
            arr = np.concatenate([np.asarray(ids, dtype=dtype), eot])[skip:]
            skip = 0
            pending.append(arr)
            pending_tokens += len(arr)
            bar.update(len(text.encode("utf-8")))
            while pending_tokens >= shard_tokens:
                position = _flush(out_dir, split, tok.vocab_size, state, state_path, pending,
                                  position, shard_tokens)
                pending_tokens -= shard_tokens
    if pending_tokens:
        _flush(out_dir, split, tok.vocab_size, state, state_path, pending, position, pending_tokens)
    state["done"] = True
    atomic_write_json(state_path, state)


def _flush(out_dir: Path, split: str, vocab_size: int, state: dict, state_path: Path,
           pending: list[np.ndarray], position: tuple[int, int], count: int) -> tuple[int, int]:
    """Write the first `count` pending tokens as the next shard and record the resume point.

    `pending[0]` starts at token `position[1]` of document `position[0]`; returns the same for
    what is left in `pending`.
    """
    doc, offset = position
    taken, used = [], 0
    while used < count:
        take = min(len(pending[0]), count - used)
        taken.append(pending[0][:take])
        used += take
        if take == len(pending[0]):
            pending.pop(0)
            doc, offset = doc + 1, 0
        else:
            pending[0] = pending[0][take:]
            offset += take
    name = f"{split}_{len(state['shards']):06d}.bin"
    write_shard(out_dir / name, np.concatenate(taken), vocab_size)
    state["shards"].append({"file": name, "tokens": used})
    state["next_doc"], state["next_offset"] = doc, offset
    atomic_write_json(state_path, state)
    return doc, offset
