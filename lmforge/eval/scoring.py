"""Log-likelihood of continuations given contexts, batched, on an lmforge model.

Tokenisation follows lm-evaluation-harness (`_encode_pair`): trailing spaces of the context move
to the continuation, the pair is encoded whole and the continuation is what follows the context's
own tokens; an empty context becomes the end-of-text token. A sequence longer than the model's
window keeps its last `max_seq_len + 1` tokens, as the harness does.

What makes it fast: the choices of a question share their context, so the context runs once, its
keys and values are kept in a KV cache, and only the choices run after it (copies of that cache).
A one-token continuation (MMLU's " A") needs no second pass at all: the context's last logits
score it. Contexts of equal length from different questions run together; longest first, so the
first batch shows the memory peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.model import KVCache, Transformer


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
    start = 0
    while start < len(prepared):
        length = len(prepared[start][0])
        end = start
        while end < len(prepared) and end - start < batch_size and len(prepared[end][0]) == length:
            end += 1
        batch = prepared[start:end]
        for index, score in _score_batch(model, batch, [fitted[i][1] for _, m in batch for i in m]):
            results[index] = score
        if progress is not None:
            progress(sum(len(m) for _, m in batch))
        start = end
    return results  # type: ignore[return-value]


def _score_batch(model: Transformer, batch: list[tuple[list[int], list[int]]],
                 continuations: list[list[int]]) -> list[tuple[int, Score]]:
    """Contexts of one length, then every continuation of theirs after a copy of its context."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    contexts = torch.tensor([c for c, _ in batch], device=device)
    n_ctx = contexts.shape[1]
    longest = max(len(c) for c in continuations)
    cache = KVCache(model.cfg, len(batch), n_ctx + longest - 1, device, dtype)
    first = F.log_softmax(model(contexts, cache=cache, last_only=True)[:, -1].float(), dim=-1)
    owner = torch.tensor([g for g, (_, members) in enumerate(batch) for _ in members], device=device)
    rest = None
    if longest > 1:  # continuation tokens 2.. are predicted from the continuation's own positions
        rows = KVCache(model.cfg, len(continuations), n_ctx + longest - 1, device, dtype)
        rows.k[:, :, :, :n_ctx] = cache.k[:, owner, :, :n_ctx]
        rows.v[:, :, :, :n_ctx] = cache.v[:, owner, :, :n_ctx]
        rows.pos = n_ctx
        inputs = torch.zeros(len(continuations), longest - 1, dtype=torch.long, device=device)
        for r, cont in enumerate(continuations):
            inputs[r, :len(cont) - 1] = torch.tensor(cont[:-1], device=device)
        rest = F.log_softmax(model(inputs, cache=rows).float(), dim=-1)
    out = []
    indices = [i for _, members in batch for i in members]
    for r, (index, cont) in enumerate(zip(indices, continuations, strict=True)):
        logp = first[owner[r]].unsqueeze(0)
        if rest is not None and len(cont) > 1:
            logp = torch.cat([logp, rest[r, :len(cont) - 1]])
        target = torch.tensor(cont, device=device)
        total = logp.gather(1, target[:, None]).sum().item()
        out.append((index, Score(total, bool((logp.argmax(-1) == target).all()))))
    return out
