"""Data stage benchmarks, side by side in one run.

1. MinHash signatures per second: lmforge's batched numpy MinHash vs datasketch's `MinHash`
   (`update_batch`, its fastest per-document path) on the same documents with the same
   permutations (datasketch's default affine32 scheme, seed 1, 128 permutations, word 5-grams),
   datasketch with its default SHA-1 shingle hash. Given our (pure-Python reference) shingle hash
   instead, datasketch must produce exactly our signatures; that is checked on a subset.
2. End-to-end `lmforge data prepare` on builtin:default with 2 workers (tokenizer training
   included), in MB of raw text per second, with the time of each phase.

    python benchmarks/bench_data.py [--docs 4000] [--skip-prepare]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def documents(n: int, chunk_chars: int = 3000) -> list[str]:
    """Web-page-sized pieces of the built-in corpus (prose and code)."""
    from lmforge.data.builtin import builtin_documents
    from lmforge.data.clean import clean_text

    out: list[str] = []
    for doc in builtin_documents():
        text = clean_text(doc.text)
        out += [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    step = max(1, len(out) // n)
    return out[::step][:n]


def bench_minhash(docs: list[str], num_perm: int = 128, ngram: int = 5) -> dict:
    from datasketch import MinHash

    from lmforge.data.dedup import MinHasher, shingle_hash32, shingle_words

    def shingles(text: str) -> list[bytes]:
        words = shingle_words(text) or [b""]
        n = min(ngram, len(words))
        return [b" ".join(words[i : i + n]) for i in range(len(words) - n + 1)]

    def run_datasketch(docs: list[str], hashfunc=None) -> tuple[float, np.ndarray]:
        kwargs = {"hashfunc": hashfunc} if hashfunc else {}
        start = time.perf_counter()
        sigs = []
        for text in docs:
            m = MinHash(num_perm=num_perm, seed=1, **kwargs)
            m.update_batch(shingles(text))
            sigs.append(m.hashvalues)
        return time.perf_counter() - start, np.array(sigs)

    ours = MinHasher(num_perm=num_perm, seed=1, ngram=ngram)
    ours.signatures(docs[:50])  # warm the word-hash cache the same way for every repeat below
    times = []
    for _ in range(3):
        start = time.perf_counter()
        sigs = ours.signatures(docs)
        times.append(time.perf_counter() - start)
    t_ours = min(times)
    t_sha1 = min(run_datasketch(docs)[0] for _ in range(2))
    check = 300
    _, ref = run_datasketch(docs[:check], shingle_hash32)
    assert np.array_equal(ref, sigs[:check]), "datasketch with our shingle hash must give our signatures"
    n = len(docs)
    return {"docs": n, "mb": sum(len(d.encode()) for d in docs) / 1e6, "checked": check,
            "ours_per_s": n / t_ours, "datasketch_per_s": n / t_sha1, "speedup": t_sha1 / t_ours}


def bench_prepare(workers: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shards"
        cmd = [sys.executable, "-m", "lmforge", "data", "prepare", "--source", "builtin:default",
               "--preset", "tiny", "--out", str(out), "--set", f"data.workers={workers}"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        seconds = time.perf_counter() - start
        manifest = json.loads((out / "manifest.json").read_text())
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        rerun = time.perf_counter() - start
    mb = manifest["read"]["bytes"] / 1e6
    return {"mb": mb, "seconds": seconds, "mb_per_s": mb / seconds, "phases": manifest["seconds"],
            "train_tokens": manifest["splits"]["train"]["tokens"],
            "val_tokens": manifest["splits"]["val"]["tokens"], "rerun_seconds": rerun}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4000)
    parser.add_argument("--skip-prepare", action="store_true")
    args = parser.parse_args()

    docs = documents(args.docs)
    m = bench_minhash(docs)
    print(f"MinHash, {m['docs']} documents ({m['mb']:.1f} MB), 128 permutations, word 5-grams:")
    print(f"  lmforge (batched numpy)             {m['ours_per_s']:9.0f} docs/s")
    print(f"  datasketch 2.x MinHash.update_batch {m['datasketch_per_s']:9.0f} docs/s"
          f"   -> lmforge is {m['speedup']:.1f}x")
    print(f"  datasketch given our shingle hash: signatures identical on {m['checked']} documents")
    if not args.skip_prepare:
        p = bench_prepare()
        phases = ", ".join(f"{k} {v:.1f}s" for k, v in p["phases"].items())
        print(f"data prepare builtin:default, 2 workers: {p['mb']:.1f} MB in {p['seconds']:.1f}s = "
              f"{p['mb_per_s']:.2f} MB/s ({phases}); {p['train_tokens']:,} train + "
              f"{p['val_tokens']:,} val tokens; rerun (resume, nothing to do) {p['rerun_seconds']:.1f}s")


if __name__ == "__main__":
    main()
