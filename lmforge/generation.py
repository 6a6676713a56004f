"""Text in, text out: the one way lmforge samples a continuation with a tokenizer.

The trainer's periodic samples, `lmforge sample` and the pipeline's sample stage all call
`generate_text`, so they agree on the rules:

- a prompt of "" (or one that encodes to nothing) starts a new document: the prompt is <|endoftext|>;
- generation stops at <|endoftext|> (not included in the text);
- ids the tokenizer does not have (model.vocab_size may be padded past tokenizer.vocab_size) are
  never sampled (`vocab_limit` of `Transformer.stream`);
- text is decoded incrementally from the byte stream, so a token that splits a UTF-8 character
  never produces a broken character in the middle of the text.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Generation:
    """A continuation: its text (without the prompt) and its token ids."""

    text: str
    token_ids: list[int]


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
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    prompt_ids = prompt_ids or [tokenizer.eot_id]
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
        for token in model.stream(prompt_ids, max_new_tokens, temperature=temperature,
                                  top_k=top_k or None, top_p=top_p, stop_tokens=[tokenizer.eot_id],
                                  generator=generator, vocab_limit=tokenizer.vocab_size,
                                  compile=compile):
            new_ids.append(token)
            emit(decoder.decode(tokenizer.decode_bytes([token])))
        emit(decoder.decode(b"", final=True))
    finally:
        model.train(was_training)
    return Generation("".join(pieces), new_ids)


__all__ = ["Generation", "generate_text"]
