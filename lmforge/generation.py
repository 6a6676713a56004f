"""Text in, text out: the one way lmforge samples a continuation with a tokenizer.

The trainer's periodic samples, `lmforge sample` and the pipeline's sample stage all call
`generate_text`, so they agree on the rules:

- a prompt of "" (or one that encodes to nothing) starts a new document: the prompt is <|endoftext|>;
- generation stops at <|endoftext|> (not included in the text);
- ids the tokenizer does not have (model.vocab_size may be padded past tokenizer.vocab_size) are
  never sampled (`vocab_limit` of `Transformer.stream`);
- text is decoded incrementally from the byte stream, so a token that splits a UTF-8 character
  never produces a broken character in the middle of the text;
- a prompt longer than the model's context and non-finite sampling values are refused (UserError)
  before anything is generated; `Generation.stopped` says why generation ended, so a caller can
  tell the user when the context, not the model, ended the text.
"""

from __future__ import annotations

import codecs
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmforge.errors import UserError


@dataclass
class Generation:
    """A continuation: its text (without the prompt) and its token ids."""

    text: str
    token_ids: list[int]
    stopped: str = "end_of_text"  # "end_of_text", "max_new_tokens" or "context" (max_seq_len reached)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
    """Refuse sampling values that would crash or silently mean something else."""
    if max_new_tokens < 0:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise UserError(f"temperature={temperature} must be a finite number >= 0 (0 is greedy)")
    if top_k is not None and top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 0 (0 disables it)")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise UserError(f"top_p={top_p} must be in (0, 1] (1 disables it)")


def prompt_ids(tokenizer, prompt: str, max_seq_len: int) -> list[int]:
    """The prompt's token ids (<|endoftext|> for an empty prompt); one that does not fit in the
    model's context is refused, never cut silently."""
    ids = (tokenizer.encode(prompt) if prompt else []) or [tokenizer.eot_id]
    if len(ids) > max_seq_len:
        raise UserError(f"the prompt is {len(ids):,} tokens ({len(prompt):,} characters) but the model's "
                        f"context is model.max_seq_len={max_seq_len:,} tokens: shorten the prompt")
    return ids


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                  seed: int = 0, on_text: Callable[[str], None] | None = None,
                  compile: bool = False) -> Generation:
    """Continue `prompt` by up to `max_new_tokens` tokens with `model` (a `Transformer`).

    temperature 0 is greedy; top_k None/0 and top_p None/1 disable those filters. The sampling
    generator lives on the model's device, seeded with `seed`. `on_text` receives each decoded
    piece as it is produced (for streaming to a terminal). `compile` runs the one-token decode
    step through torch.compile (`Transformer.generate`): for long generations from small models.
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    max_seq_len = model.cfg.max_seq_len
    ids = prompt_ids(tokenizer, prompt, max_seq_len)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces: list[str] = []
    new_ids: list[int] = []

    def emit(piece: str) -> None:
        if piece:
            pieces.append(piece)
            if on_text is not None:
                on_text(piece)

    was_training = model.training
    model.eval()
    try:
        for token in model.stream(ids, max_new_tokens, temperature=temperature,
                                  top_k=top_k or None, top_p=top_p, stop_tokens=[tokenizer.eot_id],
                                  generator=generator, vocab_limit=tokenizer.vocab_size,
                                  compile=compile):
            new_ids.append(token)
            emit(decoder.decode(tokenizer.decode_bytes([token])))
        emit(decoder.decode(b"", final=True))
    finally:
        model.train(was_training)
    # `stream` stops before yielding <|endoftext|>, so reaching either limit means it was not sampled.
    if len(new_ids) >= max_new_tokens:
        stopped = "max_new_tokens"
    elif len(ids) + len(new_ids) >= max_seq_len:
        stopped = "context"
    else:
        stopped = "end_of_text"
    return Generation("".join(pieces), new_ids, stopped)


__all__ = ["Generation", "check_sampling", "generate_text", "prompt_ids"]
