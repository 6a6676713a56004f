"""The `sft` section: what supervised fine-tuning trains on. Torch-free; part of `RunConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field

from lmforge.errors import ConfigError

OVERLONG_CHOICES = ("truncate", "drop")


@dataclass
class SftConfig:
    """Supervised fine-tuning data.

    data: sources, each `SOURCE` or `SOURCE:WEIGHT`: a JSONL or Parquet file of OpenAI messages,
        ShareGPT or Alpaca records, `builtin:chat`, or `builtin:arithmetic` (short arithmetic with
        the calculator: fine-tune on it first, then on builtin:chat, for a small model to learn it). A weight w takes round(w x N) of the
        source's N training conversations: below 1 a seeded sample, above 1 repeats (e.g.
        "builtin:chat:0.5", "mine.jsonl:3"). Default weight 1.
    val_fraction: share of a file's conversations held out (chosen by content hash) for the
        validation loss; builtin:chat holds out its test split instead.
    builtin_examples: training conversations drawn from builtin:chat at weight 1; its held-out
        split gives val_fraction times as many (at least 1 per task).
    overlong: a conversation longer than the context is cut to fit ("truncate") or left out
        ("drop"); either way the count is reported. A cut that leaves no assistant token drops it.
    strict: a malformed record is an error naming the file and line; false skips and counts it.
    """

    data: list[str] = field(default_factory=lambda: ["builtin:chat"])
    val_fraction: float = 0.05
    builtin_examples: int = 20_000
    overlong: str = "truncate"
    strict: bool = True

    def validate(self) -> None:
        if not self.data:
            raise ConfigError("sft.data is empty: name at least one file or builtin:chat")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"sft.val_fraction={self.val_fraction} must be in [0, 1)")
        if self.builtin_examples <= 0:
            raise ConfigError(f"sft.builtin_examples={self.builtin_examples} must be positive")
        if self.overlong not in OVERLONG_CHOICES:
            raise ConfigError(f"sft.overlong={self.overlong!r} must be one of {', '.join(OVERLONG_CHOICES)}")
