"""The Tokenizer: our merges served through tiktoken, plus the on-disk format.

A tokenizer is fully described by three things: the split `pattern`, the ordered `merges`
(merge i joins two existing tokens into token 256 + i), and the `special_tokens` (ids right after
the merges). Token ids double as tiktoken ranks, so encoding builds a `tiktoken.Encoding` from
our own rank table (nothing is downloaded) and gets tiktoken's native speed; the rule it applies
is spelled out in `lmforge.tokenizer.reference`, which gives identical ids.

Format (`DIR/tokenizer.json`, written atomically):
    {"format": "lmforge-bpe", "version": 1, "pattern": str, "merges": [[left, right], ...],
     "special_tokens": {str: id}, "vocab_size": int, "content_hash": "sha256:..."}
The content hash covers pattern, merges and special tokens, so a corrupted or hand-edited file is
caught on load and later stages can record exactly which tokenizer made their data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Literal

from lmforge.atomic import atomic_write_json
from lmforge.errors import UserError

FORMAT = "lmforge-bpe"
VERSION = 1
FILENAME = "tokenizer.json"

AllowedSpecial = Literal["all"] | Iterable[str]

_INVALID_RUN = re.compile("([\udc80-\udcff]+)")  # bytes that were not UTF-8, see encode_bytes


class Tokenizer:
    """Byte-level BPE tokenizer. Build one with `train_tokenizer` or `load_tokenizer`."""

    def __init__(self, merges: Sequence[tuple[int, int]], pattern: str, special_tokens: dict[str, int]):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.special_tokens = dict(special_tokens)
        self._token_bytes = [bytes([i]) for i in range(256)]
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merge {i} ({a}, {b}) refers to a token not yet defined")
            self._token_bytes.append(self._token_bytes[a] + self._token_bytes[b])
        self.ranks = {tok: i for i, tok in enumerate(self._token_bytes)}
        if len(self.ranks) != len(self._token_bytes):
            raise ValueError("two merges produce the same bytes; token bytes must be unique")
        first = len(self._token_bytes)
        if sorted(self.special_tokens.values()) != list(range(first, first + len(self.special_tokens))):
            raise ValueError(f"special token ids must be {first}..{first + len(self.special_tokens) - 1}")
        self._special_by_id = {i: s for s, i in self.special_tokens.items()}

    # -- properties ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes) + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        """Id of `<|endoftext|>`, the document separator."""
        return self.special_tokens["<|endoftext|>"]

    @property
    def pad_id(self) -> int:
        """Id of `<|pad|>`, used to fill batches to one length."""
        return self.special_tokens["<|pad|>"]

    @cached_property
    def content_hash(self) -> str:
        payload = json.dumps([self.pattern, self.merges, self.special_tokens], separators=(",", ":"))
        return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()

    def token_bytes(self, token_id: int) -> bytes:
        """The text bytes a token stands for; b"" for special tokens (they are not document text)."""
        if token_id in self._special_by_id:
            return b""
        return self._token_bytes[token_id]

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, "
                f"special_tokens={len(self.special_tokens)}, hash={self.content_hash[7:19]})")

    # -- encoding -----------------------------------------------------------------------------

    @cached_property
    def encoding(self):
        """The tiktoken.Encoding serving our ranks (built once, on first use)."""
        import tiktoken

        return tiktoken.Encoding(
            name=f"lmforge-{self.content_hash[7:19]}",
            pat_str=self.pattern,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    def _allowed(self, allowed_special: AllowedSpecial) -> set[str]:
        if allowed_special == "all":
            return set(self.special_tokens)
        allowed = set(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise ValueError(f"not special tokens of this tokenizer: {sorted(unknown)}")
        return allowed

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of `text`. Special tokens in the text are plain text unless allowed
        (`allowed_special="all"` or a set of them)."""
        allowed = self._allowed(allowed_special)
        if not allowed:
            return self.encoding.encode_ordinary(text)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: Sequence[str], allowed_special: AllowedSpecial = (), num_threads: int | None = None
    ) -> list[list[int]]:
        """Encode many texts on all cores (tiktoken releases the GIL, so threads run in parallel)."""
        texts = list(texts)
        allowed = self._allowed(allowed_special)
        num_threads = num_threads or os.cpu_count() or 1
        if num_threads == 1 or len(texts) < 2:
            return [self.encode(t, allowed) for t in texts]
        self.encoding  # noqa: B018 - build the tiktoken Encoding once, before the threads start
        # Hand each thread one contiguous slice: far less scheduling than a task per text.
        step = -(-len(texts) // (4 * num_threads))
        slices = [texts[i : i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(num_threads) as pool:
            parts = pool.map(lambda part: [self.encode(t, allowed) for t in part], slices)
            return [ids for part in parts for ids in part]

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes: valid UTF-8 runs are encoded as text, every byte that is
        not valid UTF-8 becomes its own byte token. `decode_bytes` gives `data` back exactly."""
        # surrogateescape turns each invalid byte into one lone surrogate U+DC80..U+DCFF.
        text = data.decode("utf-8", errors="surrogateescape")
        ids: list[int] = []
        for i, piece in enumerate(_INVALID_RUN.split(text)):
            if i % 2:
                ids.extend(ord(c) - 0xDC00 for c in piece)  # byte b has token id b
            elif piece:
                ids.extend(self.encode(piece))
        return ids

    def encode_reference(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """The same ids as `encode`, computed by the readable pure-Python reference (slow)."""
        from lmforge.tokenizer import reference

        return reference.encode(text, self.pattern, self.ranks, self.special_tokens,
                                self._allowed(allowed_special))

    # -- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of `ids` (special tokens as their text). Lossless for any input."""
        ids = list(ids)
        try:
            return self.encoding.decode_bytes(ids)  # native speed for the common case
        except (KeyError, OverflowError, TypeError):
            pass  # fall through to find the bad id and say which it is
        out = []
        n = len(self._token_bytes)
        for i in ids:
            if 0 <= i < n:
                out.append(self._token_bytes[i])
            elif i in self._special_by_id:
                out.append(self._special_by_id[i].encode("utf-8"))
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # -- storage ------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
            "special_tokens": self.special_tokens,
            "vocab_size": self.vocab_size,
            "content_hash": self.content_hash,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/tokenizer.json` atomically; returns its path."""
        path = Path(directory) / FILENAME
        atomic_write_json(path, self.to_dict())
        return path


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer directory (or its tokenizer.json). Any problem is one-line UserError."""
    path = Path(directory)
    if path.is_dir():
        path = path / FILENAME
    if not path.is_file():
        raise UserError(f"{path}: tokenizer file not found (expected a directory written by "
                        "`lmforge tokenizer train`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a valid tokenizer file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not an lmforge tokenizer (expected \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise UserError(f"{path}: tokenizer format version {data.get('version')!r} is not supported "
                        f"(this lmforge reads version {VERSION})")
    try:
        tok = Tokenizer([tuple(m) for m in data["merges"]], data["pattern"], data["special_tokens"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: malformed tokenizer file ({type(e).__name__}: {e})") from None
    if tok.content_hash != data.get("content_hash"):
        raise UserError(f"{path}: content hash mismatch: the file is corrupt or was edited")
    return tok
