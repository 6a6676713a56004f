"""Validation loss and bits per byte.

Loss per token depends on the tokenizer (a bigger vocabulary packs more text into a token), so
runs with different tokenizers are compared in bits per byte instead:

    bpb = (sum over target tokens of their cross-entropy in nats) / (ln 2 * bytes those tokens spell)

Special tokens (`<|endoftext|>`...) spell no text: they have 0 bytes and are left out of both sums.
`val_loss` is the plain mean cross-entropy over every target token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable

import torch
from torch import nn


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) long: bytes each token id spells; 0 for special tokens and unused ids."""
    lengths = torch.zeros(vocab_size, dtype=torch.long)
    for token_id in range(min(vocab_size, tokenizer.vocab_size)):
        lengths[token_id] = len(tokenizer.token_bytes(token_id))
    return lengths


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean validation loss and bits per byte over `batches`, summed over ranks if asked.

    `loss_fn(x, y)` gives per-token losses (default `model.loss(x, y, reduction="none")`); a
    training run passes the parallelism seam's `evaluate`, which works on split models too.
    """
    was_training = model.training
    model.eval()
    device = byte_lengths.device
    # [loss sum, tokens, loss sum of text tokens, bytes of text tokens]
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for x, y in batches:
        with autocast():
            per_token = (loss_fn(x, y) if loss_fn else model.loss(x, y, reduction="none")).double()
        nbytes = byte_lengths[y]
        text = nbytes > 0
        totals += torch.stack([
            per_token.sum(), torch.tensor(y.numel(), dtype=torch.float64, device=device),
            per_token[text].sum(), nbytes.sum().double(),
        ])
    if all_reduce_sum is not None:
        totals = all_reduce_sum(totals)
    model.train(was_training)
    loss_sum, tokens, text_loss, nbytes = totals.tolist()
    return {
        "val_loss": loss_sum / max(tokens, 1.0),
        "val_bpb": text_loss / (math.log(2) * nbytes) if nbytes else math.nan,
    }
