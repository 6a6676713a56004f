"""SFT data: conversation files and builtin:chat -> rendered examples -> padded batches.

Readers. One record per JSONL line or Parquet row, in any of three shapes (detected per record):
  OpenAI     {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
  ShareGPT   {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}
             (and an optional top-level "system": ...)
  Alpaca     {"instruction": ..., "input": ... (optional), "output": ...}
A malformed record is a UserError naming file and line, or skipped and counted (`sft.strict`).

Mixtures. `--data SOURCE[:WEIGHT]`, see `SftConfig.data`; `builtin:chat` (and
`builtin:arithmetic`, short arithmetic for a curriculum's first stage) come from `lmforge.tasks`.
Files hold out `val_fraction` of their conversations by content hash (stable however the file is
ordered or mixed); the built-in sources hold out their test split.

Text. `text:SHARDS[:WEIGHT]` mixes windows of pre-training text (the token shards of `lmforge data
prepare`, tokenized by the model's own tokenizer) into the training rows, with the loss on every
token: plain next-token prediction beside the chat turns, so fine-tuning does not make the model
forget the language it read (`text_examples`). A weight w takes round(w x N) of the split's N
windows of the context's length; validation adds as many of the val split's windows as
`val_fraction` of that.

Batches. Each conversation is rendered with the chat format (ids + loss mask) and becomes one row:
inputs ids[:-1], targets ids[1:] with -100 where the mask is 0. Rows of similar length are
bucketed into a batch and right-padded (inputs with <|pad|>, targets with -100); causal attention
never lets a real token see the padding after it, so an example's loss is the same batched or
alone. Conversations longer than the context are cut or dropped, and counted (`RenderStats`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.chat.format import render_conversation, validate_messages
from lmforge.errors import UserError

if TYPE_CHECKING:
    from lmforge.finetune.config import SftConfig
    from lmforge.tasks.common import Task

IGNORE = -100  # target value the loss skips
BUILTIN_CHAT = "builtin:chat"
BUILTIN_ARITHMETIC = "builtin:arithmetic"
TEXT_PREFIX = "text:"  # text:SHARDS_DIR: pre-training text windows, see the module doc
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}

Messages = list[dict[str, str]]


# -- sources -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """One `--data` item: where conversations come from and how much of them to take."""

    path: str
    weight: float = 1.0


def parse_source(spec: str) -> Source:
    """'mine.jsonl' -> weight 1; 'mine.jsonl:3' or 'builtin:chat:0.5' -> that weight."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and head != "builtin":
        try:
            weight = float(tail)
        except ValueError:
            return Source(spec)
        if not weight > 0:
            raise UserError(f"--data {spec}: the weight must be a positive number, not {tail}")
        return Source(head, weight)
    return Source(spec)


# -- records -----------------------------------------------------------------------------------


def to_messages(record: object) -> Messages:
    """A record in OpenAI, ShareGPT or Alpaca shape as OpenAI messages; ValueError if none fits."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "conversations" in record:
        messages = [_sharegpt_turn(turn) for turn in _as_list(record["conversations"], "conversations")]
        if isinstance(record.get("system"), str) and record["system"]:  # a variant keeps it apart
            messages.insert(0, {"role": "system", "content": record["system"]})
    elif "instruction" in record and "output" in record:
        prompt = "\n\n".join(str(record[k]) for k in ("instruction", "input") if record.get(k))
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": str(record["output"])}]
    else:
        raise ValueError("expected \"messages\" (OpenAI), \"conversations\" (ShareGPT) or "
                         "\"instruction\" and \"output\" (Alpaca)")
    try:
        validate_messages(messages)
    except UserError as e:
        raise ValueError(str(e)) from None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _as_list(value: object, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"\"{name}\" must be a list, not {type(value).__name__}")
    return value


def _sharegpt_turn(turn: object) -> dict[str, str]:
    if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
        raise ValueError("each ShareGPT turn must be an object with \"from\" and \"value\"")
    role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
    if role is None:
        raise ValueError(f"unknown ShareGPT speaker {turn['from']!r} "
                         f"(expected one of {', '.join(SHAREGPT_ROLES)})")
    return {"role": role, "content": turn["value"]}


@dataclass
class FileConversations:
    conversations: list[Messages]
    skipped: int  # malformed records left out (only when not strict)


def read_conversations(path: str | Path, strict: bool = True) -> FileConversations:
    """Every conversation in a JSONL or Parquet file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a .jsonl or .parquet file, or {BUILTIN_CHAT})")
    records = _parquet_records(path) if path.suffix == ".parquet" else jsonl_records(path)
    out, skipped = [], 0
    for line, record in records:
        try:
            if isinstance(record, Exception):
                raise ValueError(str(record))
            out.append(to_messages(record))
        except ValueError as e:
            if strict:
                raise UserError(f"{path}:{line}: {e}") from None
            skipped += 1
    if not out:
        raise UserError(f"{path}: no conversations in it"
                        + (f" ({skipped} malformed records skipped)" if skipped else ""))
    return FileConversations(out, skipped)


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record or the error that line gave) for each non-empty line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield number, ValueError(f"not a JSON line ({e.__class__.__name__}: {e}); "
                                         "expected JSONL, one JSON object per line")


def _parquet_records(path: Path) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises many types for a damaged file
        raise UserError(f"{path}: not a readable Parquet file ({e})") from None
    yield from enumerate(rows, 1)  # "line" N is row N


# -- the SFT data set --------------------------------------------------------------------------


@dataclass
class SftData:
    """Training and validation conversations, and what was left out while reading."""

    train: list[Messages] = field(default_factory=list)
    val: list[Messages] = field(default_factory=list)
    skipped: int = 0  # malformed records (only when not strict)
    text: list[Source] = field(default_factory=list)  # text:SHARDS sources, cut once the context is known


def conversation_hash(messages: Messages) -> float:
    """A number in [0, 1) fixed by the conversation's content (for the held-out split)."""
    payload = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big") / 2**64


def weighted(items: Sequence, weight: float, rng: random.Random) -> list:
    """round(weight x len(items)) items: whole copies, then a seeded sample for the remainder."""
    want = round(weight * len(items))
    whole, rest = divmod(want, len(items)) if items else (0, 0)
    return list(items) * whole + rng.sample(list(items), rest)


def load_sft_data(sources: Sequence[str], seed: int = 0, val_fraction: float = 0.05,
                  builtin_examples: int = 20_000, strict: bool = True,
                  tasks: dict[str, Task] | None = None) -> SftData:
    """Read and mix `sources` (see `SftConfig.data`); the same seed gives the same data.
    `tasks` replaces the built-in task generators (tests)."""
    data = SftData()
    for spec in sources:
        source = parse_source(spec)
        rng = random.Random(f"{seed}/{spec}")
        if source.path.startswith(TEXT_PREFIX):
            shards = Path(source.path[len(TEXT_PREFIX):])
            if not (shards / "manifest.json").is_file():
                raise UserError(f"--data {spec}: {shards} holds no token shards (no manifest.json); "
                                "make them with `lmforge data prepare`")
            data.text.append(source)
            continue
        if source.path in (BUILTIN_CHAT, BUILTIN_ARITHMETIC):
            train, val = _builtin(source.path, seed, builtin_examples, val_fraction, tasks)
        else:
            read = read_conversations(source.path, strict)
            data.skipped += read.skipped
            train = [c for c in read.conversations if conversation_hash(c) >= val_fraction]
            val = [c for c in read.conversations if conversation_hash(c) < val_fraction]
        data.train += weighted(train, source.weight, rng)
        data.val += val
    random.Random(seed).shuffle(data.train)
    return data


def sft_data(cfg: SftConfig, seed: int) -> SftData:
    """`load_sft_data` as the `sft` config section describes it."""
    return load_sft_data(cfg.data, seed, cfg.val_fraction, cfg.builtin_examples, cfg.strict)


def _builtin(name: str, seed: int, n: int, val_fraction: float,
             tasks: dict[str, Task] | None) -> tuple[list[Messages], list[Messages]]:
    from lmforge.tasks import builtin_arithmetic, builtin_chat

    def draw(split: str, count: int) -> list:
        if name == BUILTIN_ARITHMETIC:
            return builtin_arithmetic(split, seed, count)
        return builtin_chat(split, seed, count, tasks=tasks)

    train = draw("train", n)
    val = draw("test", max(1, round(val_fraction * n))) if val_fraction else []
    # Copies: the generators' examples are shared (cached pools).
    return [[dict(m) for m in e.messages] for e in train], [[dict(m) for m in e.messages] for e in val]


def text_examples(source: Source, split: str, context: int, tokenizer, seed: int,
                  count: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) rows of `context` + 1 tokens from a text:SHARDS source's `split`, every
    target counted: round(weight x windows) of them, or `count`, a seeded choice. The shards must
    have been tokenized by `tokenizer` (the manifest's content hash)."""
    import numpy as np

    from lmforge.data.loader import TokenLoader

    shards = Path(source.path[len(TEXT_PREFIX):])
    manifest = json.loads((shards / "manifest.json").read_text(encoding="utf-8"))
    made_by = manifest.get("tokenizer", {}).get("hash")
    if made_by != tokenizer.content_hash:
        raise UserError(f"--data {source.path}: its shards were tokenized by another tokenizer "
                        f"({str(made_by)[:19]}) than the model's ({tokenizer.content_hash[:19]})")
    loader = TokenLoader(shards, split, seq_len=context, batch_size=1, shuffle=False, verify=False)
    total = loader.windows_per_epoch
    want = round(source.weight * total) if count is None else count
    if want == 0:
        return []
    rng = np.random.default_rng([seed, len(split)])
    indices = np.concatenate([rng.permutation(total) for _ in range(-(-want // total))])[:want]
    return [(row.tolist(), [1] * len(row)) for row in loader.windows(np.sort(indices))]


# -- rendering and batches -----------------------------------------------------------------------


@dataclass
class RenderStats:
    """What happened to conversations on the way to rows, for the log."""

    kept: int = 0
    truncated: int = 0  # cut to the context (still kept)
    dropped: int = 0  # longer than the context under "drop", or nothing left to learn after a cut

    def describe(self) -> str:
        return (f"{self.kept} conversations kept, {self.truncated} truncated and {self.dropped} "
                f"dropped for being longer than the context")


def render_examples(tokenizer, conversations: Sequence[Messages], context: int,
                    overlong: str = "truncate") -> tuple[list[tuple[list[int], list[int]]], RenderStats]:
    """(ids, loss mask) per conversation, each at most `context` + 1 tokens (one row of
    `context` inputs and targets), and the counts of what was cut or dropped."""
    out, stats = [], RenderStats()
    for messages in conversations:
        ids, mask = render_conversation(tokenizer, messages)
        if len(ids) > context + 1:
            if overlong == "drop":
                stats.dropped += 1
                continue
            ids, mask = ids[: context + 1], mask[: context + 1]
            if not any(mask[1:]):  # the cut removed every assistant token: nothing to learn
                stats.dropped += 1
                continue
            stats.truncated += 1
        out.append((ids, mask))
        stats.kept += 1
    return out, stats


def to_row(ids: Sequence[int], mask: Sequence[int]) -> tuple[list[int], list[int]]:
    """Inputs and next-token targets of one example; targets are IGNORE where not learned."""
    return list(ids[:-1]), [t if m else IGNORE for t, m in zip(ids[1:], mask[1:])]


def bucket_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int,
                   seed: int) -> list[list[int]]:
    """Indices of `examples` grouped into batches of similar length, in a seeded random order.

    Sorting by length (ties in a seeded random order) and cutting into runs of `batch_size`
    keeps padding small; shuffling the batches keeps the training order random."""
    rng = random.Random(seed)
    order = list(range(len(examples)))
    rng.shuffle(order)
    order.sort(key=lambda i: len(examples[i][0]))  # stable: ties keep the shuffled order
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """(inputs, targets) LongTensors of shape (B, longest row), right-padded."""
    import torch

    rows = [to_row(ids, mask) for ids, mask in examples]
    width = max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for r, (x, y) in enumerate(rows):
        inputs[r, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[r, : len(y)] = torch.tensor(y, dtype=torch.long)
    return inputs, targets


def iter_batches(examples: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                 seed: int) -> Iterator:
    """One epoch of padded (inputs, targets) batches, bucketed by length (see `bucket_batches`)."""
    for batch in bucket_batches(examples, batch_size, seed):
        yield collate([examples[i] for i in batch], pad_id)
