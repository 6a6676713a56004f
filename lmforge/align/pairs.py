"""Preference pairs: records -> `Pair`s -> rendered token rows, for DPO and reward models.

A record is one JSON object per line with `prompt`, `chosen` and `rejected`, each a string or a
list of chat messages:

    {"prompt": "What is 2 + 3?", "chosen": "5", "rejected": "6"}
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": "Go away."}

A string prompt is one user turn; a string answer is one assistant turn. The answers continue the
prompt, so the prompt must not end with an assistant turn. A malformed record, or one whose chosen
and rejected answers are the same, is a UserError naming the file and line.

Rendering: prompt + answer with the chat format; the mask is 1 on the answer's assistant tokens
only (never on assistant turns inside the prompt), so a pair's log-probabilities are those of its
answers. A pair with an answer longer than the context is left out and counted.
`builtin:prefs` (pairs sampled from the policy itself) is built in lmforge/align/prefs.py.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.chat.format import render_conversation, render_prompt, validate_messages
from lmforge.errors import UserError
from lmforge.finetune.data import Messages, parse_source, weighted

BUILTIN_PREFS = "builtin:prefs"
FIELDS = ("prompt", "chosen", "rejected")
Row = tuple[list[int], list[int]]  # (ids, loss mask) of one rendered conversation


@dataclass(frozen=True)
class Pair:
    """A prompt and two answers to it, the first preferred."""

    prompt: Messages
    chosen: Messages
    rejected: Messages

    def to_json(self) -> dict[str, Messages]:
        return {"prompt": self.prompt, "chosen": self.chosen, "rejected": self.rejected}


def to_pair(record: object) -> Pair:
    """A record as a Pair; ValueError saying what is wrong."""
    require_fields(record, FIELDS)
    prompt, chosen = to_answer(record["prompt"], record["chosen"], "chosen")
    _, rejected = to_answer(record["prompt"], record["rejected"], "rejected")
    if chosen == rejected:
        raise ValueError("\"chosen\" and \"rejected\" are the same answer: the pair prefers nothing")
    return Pair(prompt, chosen, rejected)


def require_fields(record: object, fields: Sequence[str]) -> None:
    """ValueError unless `record` is a JSON object with every one of `fields`."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, not {type(record).__name__}")
    missing = [name for name in fields if name not in record]
    if missing:
        raise ValueError(f"missing field {', '.join(map(repr, missing))} (expected "
                         f"{', '.join(map(repr, fields))})")


def to_answer(prompt_value: object, answer_value: object, name: str = "answer") -> tuple[Messages, Messages]:
    """A prompt and an answer to it (each a string or chat messages) as messages; ValueError
    saying what is wrong. `name` is the answer's field, for the message."""
    prompt = _messages(prompt_value, "user", "prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError("\"prompt\" ends with an assistant turn; the answers continue it")
    answer = _messages(answer_value, "assistant", name)
    if not any(m["role"] == "assistant" for m in answer):
        raise ValueError(f"\"{name}\" has no assistant turn")
    _check(prompt + answer, name)
    return prompt, answer


def _messages(value: object, role: str, name: str) -> Messages:
    """A string as one `role` turn, or a list of chat messages (checked)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f"\"{name}\" must be a string or a list of chat messages, not {type(value).__name__}")
    _check(value, name, need_assistant=False)
    return [{"role": m["role"], "content": m["content"]} for m in value]


def _check(messages: list, name: str, need_assistant: bool = True) -> None:
    try:
        validate_messages(messages, need_assistant=need_assistant)
    except UserError as e:
        raise ValueError(f"\"{name}\": {e}") from None


def read_pairs(path: str | Path) -> list[Pair]:
    """Every pair of a JSONL file, in file order; a bad record is a UserError naming its line."""
    from lmforge.finetune.data import jsonl_records

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected a JSONL file of preference pairs, or {BUILTIN_PREFS})")
    pairs = []
    for line, record in jsonl_records(path):
        try:
            if isinstance(record, Exception):
                raise record
            pairs.append(to_pair(record))
        except ValueError as e:
            raise UserError(f"{path}:{line}: {e}") from None
    if not pairs:
        raise UserError(f"{path}: no preference pairs in it")
    return pairs


def write_pairs(path: Path, pairs: Sequence[Pair]) -> None:
    from lmforge.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(p.to_json(), ensure_ascii=False) + "\n" for p in pairs))


# -- the data of a run ---------------------------------------------------------------------------


@dataclass
class PairData:
    """Training and held-out pairs, and lines for the log about how they were made."""

    train: list[Pair] = field(default_factory=list)
    val: list[Pair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def pair_hash(pair: Pair) -> float:
    """A number in [0, 1) fixed by the pair's content (for the held-out split)."""
    payload = json.dumps(pair.to_json(), sort_keys=True, ensure_ascii=False).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "big") / 2**64


def load_pairs(sources: Sequence[str], seed: int, val_fraction: float,
               builtin: Callable[[], PairData] | None = None) -> PairData:
    """Read and mix `sources` (files and `builtin:prefs`, each with an optional :WEIGHT); a file
    holds out `val_fraction` of its pairs by content hash. `builtin` makes builtin:prefs (it
    needs the model: see prefs.py); the same seed gives the same data."""
    data = PairData()
    for spec in sources:
        source = parse_source(spec)
        if source.path == BUILTIN_PREFS:
            if builtin is None:
                raise UserError(f"{BUILTIN_PREFS} needs a policy model to sample from")
            made = builtin()
            train, val = made.train, made.val
            data.notes += made.notes
        else:
            pairs = read_pairs(source.path)
            train = [p for p in pairs if pair_hash(p) >= val_fraction]
            val = [p for p in pairs if pair_hash(p) < val_fraction]
        data.train += weighted(train, source.weight, random.Random(f"{seed}/{spec}"))
        data.val += val
    random.Random(seed).shuffle(data.train)
    if not data.train:
        raise UserError(f"no training pairs in {' '.join(sources)}")
    return data


# -- rendering ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RenderedPair:
    chosen: Row
    rejected: Row

    @property
    def longest(self) -> Row:
        return max(self.chosen, self.rejected, key=lambda row: len(row[0]))


def render_answer(tokenizer, prompt: Messages, answer: Messages) -> Row:
    """Token ids of prompt + answer and a mask that is 1 on the answer's assistant tokens only."""
    ids, mask = render_conversation(tokenizer, prompt + answer)
    start = len(render_prompt(tokenizer, prompt))  # the prompt and the answer's role token
    return ids, [0] * start + mask[start:]


def render_pairs(tokenizer, pairs: Sequence[Pair], context: int) -> tuple[list[RenderedPair], int]:
    """Rendered pairs that fit in `context` + 1 tokens, and how many did not (left out)."""
    out, dropped = [], 0
    for pair in pairs:
        rows = [render_answer(tokenizer, pair.prompt, a) for a in (pair.chosen, pair.rejected)]
        if any(len(ids) > context + 1 for ids, _ in rows):
            dropped += 1
            continue
        out.append(RenderedPair(*rows))
    return out, dropped


__all__ = ["BUILTIN_PREFS", "Pair", "PairData", "RenderedPair", "load_pairs", "pair_hash", "read_pairs",
           "render_answer", "render_pairs", "require_fields", "to_answer", "to_pair", "write_pairs"]
