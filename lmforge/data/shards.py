"""The token shard file: a 32-byte header, then the token ids as little-endian integers.

    offset  size  field
    0       8     magic b"LMFSHARD"
    8       4     format version (uint32, currently 1)
    12      4     bytes per token: 2 (uint16, vocabularies below 65,536) or 4 (uint32)
    16      8     token count (uint64)
    24      4     CRC-32 of the token bytes (uint32)
    28      4     vocabulary size of the tokenizer that wrote it (uint32)

The payload starts at byte 32, so it can be memory-mapped directly. Every reader goes through
`open_shard`, which checks all of the above and turns any mismatch (a truncated copy, a flipped
bit, a file from something else) into one UserError naming the file.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.atomic import atomic_write_bytes
from lmforge.errors import UserError

MAGIC = b"LMFSHARD"
VERSION = 1
HEADER = struct.Struct("<8sIIQII")
HEADER_SIZE = HEADER.size  # 32
DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    itemsize: int
    tokens: int
    checksum: int
    vocab_size: int

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.itemsize]


def inside_root(root: Path, name: str, where: str) -> Path:
    """`root / name` for a path a manifest names; one that leads outside `root` (`../x`, an
    absolute path, a symlink out) is refused, so a manifest cannot make us read other files."""
    path = Path(root) / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(Path(root).resolve()):
        raise UserError(f"{where}: {name!r} is outside {root}; refusing to read it")
    return path


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65,536), else uint32."""
    return DTYPES[2] if vocab_size < 1 << 16 else DTYPES[4]


def write_shard(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Write `tokens` as a shard file atomically (a reader never sees half a shard)."""
    dtype = token_dtype(vocab_size)
    if len(tokens) and int(tokens.max()) >= vocab_size:
        raise ValueError(f"token id {int(tokens.max())} >= vocab_size {vocab_size}")
    payload = np.ascontiguousarray(tokens, dtype=dtype).tobytes()
    header = HEADER.pack(MAGIC, VERSION, dtype.itemsize, len(tokens), zlib.crc32(payload), vocab_size)
    atomic_write_bytes(path, header + payload)


def read_header(path: str | Path) -> ShardHeader:
    """Parse and check the header and the file size (cheap: does not read the tokens)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        size = path.stat().st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read shard: {e.strerror or e}") from None
    if len(raw) < HEADER_SIZE:
        raise UserError(f"{path}: truncated shard: {len(raw)} bytes, shorter than its 32-byte header")
    magic, version, itemsize, count, checksum, vocab_size = HEADER.unpack(raw)
    if magic != MAGIC:
        raise UserError(f"{path}: not an lmforge token shard (bad magic {magic!r})")
    if version != VERSION:
        raise UserError(f"{path}: shard format version {version} is not supported (this lmforge "
                        f"reads version {VERSION}); rerun `lmforge data prepare`")
    if itemsize not in DTYPES:
        raise UserError(f"{path}: corrupt shard header: {itemsize} bytes per token")
    expected = HEADER_SIZE + count * itemsize
    if size != expected:
        state = "truncated" if size < expected else "corrupt"
        raise UserError(f"{path}: {state} shard: header says {count} tokens ({expected} bytes) but "
                        f"the file has {size} bytes; rerun `lmforge data prepare` to rewrite it")
    return ShardHeader(path, itemsize, count, checksum, vocab_size)


def open_shard(path: str | Path, verify: bool = True) -> np.ndarray:
    """The shard's tokens as a read-only memory map; `verify` also checks the CRC-32."""
    header = read_header(path)
    if header.tokens == 0:
        return np.empty(0, dtype=header.dtype)
    tokens = np.memmap(header.path, dtype=header.dtype, mode="r", offset=HEADER_SIZE,
                       shape=(header.tokens,))
    if verify and zlib.crc32(tokens) != header.checksum:
        raise UserError(f"{header.path}: corrupt shard: checksum mismatch (the file was damaged "
                        "after it was written); rerun `lmforge data prepare` to rewrite it")
    return tokens
