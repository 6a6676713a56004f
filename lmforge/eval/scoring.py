"""Log-likelihood of continuations given contexts, batched, on an lmforge model.

Tokenisation follows lm-evaluation-harness (`_encode_pair`): trailing spaces of the context move
to the continuation, the pair is encoded whole and the continuation is what follows the context's
own tokens; an empty context becomes the end-of-text token. A sequence longer than the model's
window keeps its last `max_seq_len + 1` tokens, as the harness does.

What makes it fast: the choices of a question share their context, so the context runs once, its
keys and values are kept in a KV cache, and only the choices run after it (copies of that cache).
A one-token continuation (MMLU's " A") needs no second pass at all: the context's last logits
score it. `batch_size` contexts run in one pass (right-padded), longest first, so the first batch
shows the memory peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.engine import KVCache
from lmforge.model import Transformer


@dataclass(frozen=True)
class Score:
    """Sum of the continuation tokens' log-probabilities, and whether greedy decoding gives it."""

    logprob: float
    greedy: bool


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness splits them."""
    if not context:
        return [tokenizer.eot_id], tokenizer.encode(continuation)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    context_ids = tokenizer.encode(context)
    return whole[:len(context_ids)], whole[len(context_ids):]


def _fit(context: list[int], continuation: list[int], window: int) -> tuple[list[int], list[int]]:
    """Cut from the left so that context + continuation - 1 tokens fit the window. A continuation
    longer than the window itself is scored on its last `window` tokens (the rest joins the
    context): a tiny model's short window should not stop a whole benchmark."""
    if len(continuation) > window:
        excess = len(continuation) - window
        context, continuation = context + continuation[:excess], continuation[excess:]
    keep = window + 1 - len(continuation)
    return (context[-keep:] if len(context) > keep else context), continuation


@torch.no_grad()
def score_requests(
    model: Transformer,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> list[Score]:
    """Score each (context ids, continuation ids); `batch_size` counts contexts per forward pass.

    `progress(n)` is called with the number of requests each batch finished.
    """
    # Group requests by (fitted) context: one group runs its context once.
    groups: dict[tuple[int, ...], list[int]] = {}
    fitted = [_fit(context, continuation, model.cfg.max_seq_len) for context, continuation in requests]
    for index, (context, _) in enumerate(fitted):
        groups.setdefault(tuple(context), []).append(index)
    prepared = [(list(context), members) for context, members in groups.items()]
    prepared.sort(key=lambda g: -len(g[0]))
    results: list[Score | None] = [None] * len(requests)
    for start in range(0, len(prepared), batch_size):
        batch = prepared[start:start + batch_size]
        for index, score in _score_batch(model, batch, fitted):
            results[index] = score
        if progress is not None:
            progress(sum(len(m) for _, m in batch))
    return results  # type: ignore[return-value]


def _score_batch(model: Transformer, batch: list[tuple[list[int], list[int]]],
                 fitted: list[tuple[list[int], list[int]]]) -> list[tuple[int, Score]]:
    """The batch's contexts in one pass, then each context length's continuations in one pass.

    Contexts are right-padded: attention is causal, so padding after a context changes nothing
    before it, and its cached keys/values up to the context's own length are exact. The
    continuations resume from a copy of their context's cache at that length, so a pass takes
    the continuations of contexts of one length.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lengths = [len(c) for c, _ in batch]
    contexts = torch.zeros(len(batch), max(lengths), dtype=torch.long, device=device)
    for g, (context, _) in enumerate(batch):
        contexts[g, :len(context)] = torch.tensor(context, device=device)
    cache = KVCache(model.cfg, len(batch), max(lengths), device, dtype)
    hidden = model.hidden_states(contexts, cache)
    last = hidden[torch.arange(len(batch), device=device), torch.tensor(lengths, device=device) - 1]
    first = F.log_softmax(model.head(model.norm(last)).float(), dim=-1)  # predicts token 1
    out = []
    for length in sorted(set(lengths), reverse=True):
        owners = [g for g, n in enumerate(lengths) if n == length]
        indices = [i for g in owners for i in batch[g][1]]
        continuations = [fitted[i][1] for i in indices]
        row_owner = [g for g in owners for _ in batch[g][1]]
        rest = _continue(model, cache, length, row_owner, continuations)
        for r, (index, cont) in enumerate(zip(indices, continuations, strict=True)):
            logp = first[row_owner[r]].unsqueeze(0)
            if rest[r] is not None:
                logp = torch.cat([logp, rest[r]])
            target = torch.tensor(cont, device=device)
            total = logp.gather(1, target[:, None]).sum().item()
            out.append((index, Score(total, bool((logp.argmax(-1) == target).all()))))
    return out


def _continue(model: Transformer, cache: KVCache, length: int, row_owner: list[int],
              continuations: list[list[int]]) -> list[torch.Tensor | None]:
    """Per row, the log-probabilities after each continuation token but the last (tokens - 1,
    vocab), each row resuming from its context's cached keys/values (None for one-token rows).

    Rows are sorted by length and cut into passes whose padding stays small: continuations of
    one question can differ several-fold in length (HellaSwag's endings), and padded positions
    cost as much as real ones.
    """
    out: list[torch.Tensor | None] = [None] * len(continuations)
    order = sorted((r for r, c in enumerate(continuations) if len(c) > 1),
                   key=lambda r: -len(continuations[r]))
    chunk: list[int] = []
    for r in order + [-1]:  # -1 flushes the last chunk
        if chunk and (r < 0 or len(continuations[r]) - 1 < 0.75 * (len(continuations[chunk[0]]) - 1)):
            rows = [continuations[i] for i in chunk]
            logp = _continue_pass(model, cache, length, [row_owner[i] for i in chunk], rows)
            for k, i in enumerate(chunk):
                out[i] = logp[k, :len(continuations[i]) - 1]
            chunk = []
        chunk.append(r)
    return out


def _continue_pass(model: Transformer, cache: KVCache, length: int, row_owner: list[int],
                   continuations: list[list[int]]) -> torch.Tensor:
    """One forward pass of right-padded continuations (minus their last token) after copies of
    their contexts' caches: log-probabilities (rows, longest - 1, vocab)."""
    longest = max(len(c) for c in continuations)
    device = cache.k.device
    owner = torch.tensor(row_owner, device=device)
    rows = KVCache(model.cfg, len(continuations), length + longest - 1, device, cache.k.dtype)
    rows.k[:, :, :, :length] = cache.k[:, owner, :, :length]
    rows.v[:, :, :, :length] = cache.v[:, owner, :, :length]
    rows.pos = length
    inputs = torch.zeros(len(continuations), longest - 1, dtype=torch.long, device=device)
    for r, cont in enumerate(continuations):
        inputs[r, :len(cont) - 1] = torch.tensor(cont[:-1], device=device)
    return F.log_softmax(model(inputs, cache=rows).float(), dim=-1)
