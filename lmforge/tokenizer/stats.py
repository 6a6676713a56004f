"""What a tokenizer does to some text: compression, vocabulary use, its longest tokens.

One function serves `lmforge tokenizer stats` and the run report (RUN/tokenizer/stats.json, whose
keys are part of the run directory contract in docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from lmforge.tokenizer.tokenizer import Tokenizer


def tokenizer_stats(tok: Tokenizer, texts: Iterable[str], longest: int = 10,
                    max_bytes: int | None = None) -> dict[str, Any]:
    """Bytes per token and vocabulary share used on `texts`, and the `longest` tokens.

    Reading stops after the text that reaches `max_bytes` (None: read all). Runs of whitespace
    (code indentation) would fill the longest-token list, so they are left out of it and only the
    length of the longest one is reported. Special tokens have no text bytes and count as neither.
    """
    used: Counter[int] = Counter()
    n_bytes = n_tokens = 0
    for text in texts:
        ids = tok.encode(text)
        used.update(ids)
        n_tokens += len(ids)
        n_bytes += len(text.encode("utf-8"))
        if max_bytes is not None and n_bytes >= max_bytes:
            break
    regular = [i for i in range(tok.vocab_size) if tok.token_bytes(i)]
    worded = [i for i in regular if tok.token_bytes(i).strip()]
    top = sorted(worded, key=lambda i: (-len(tok.token_bytes(i)), i))[:longest]
    spaces = [len(tok.token_bytes(i)) for i in regular if not tok.token_bytes(i).strip()]
    return {
        "vocab_size": tok.vocab_size,
        "merges": len(regular) - 256,
        "special_tokens": len(tok.special_tokens),
        "val_bytes": n_bytes,
        "val_tokens": n_tokens,
        "val_bytes_per_token": n_bytes / n_tokens if n_tokens else None,
        "regular_tokens_used": len(used),
        "regular_tokens_used_share": len(used) / len(regular) if regular else 0.0,
        "longest_whitespace_token": max(spaces, default=0),
        "longest_tokens": [{"id": i, "bytes": len(tok.token_bytes(i)),
                            "text": tok.token_bytes(i).decode("utf-8", "backslashreplace"),
                            "uses": used[i]} for i in top],
        "content_hash": tok.content_hash,
    }


__all__ = ["tokenizer_stats"]
