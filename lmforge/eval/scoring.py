"""Log-likelihood of continuations given contexts, batched, on an lmforge model.

Tokenisation follows lm-evaluation-harness (`_encode_pair`): trailing spaces of the context move
to the continuation, the pair is encoded whole and the continuation is what follows the context's
own tokens; an empty context becomes the end-of-text token. A sequence longer than the model's
window keeps its last `max_seq_len + 1` tokens, as the harness does.

What makes it fast: the choices of a question share their context, so the context runs once, its
keys and values are kept in a KV cache, and only the choices run after it (copies of that cache,
the continuations of contexts of any length in one pass).
A one-token continuation (MMLU's " A") needs no second pass at all: the context's last logits
score it. `batch_size` contexts run in one pass (right-padded), longest first, so the first batch
shows the memory peak.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmforge.engine import KVCache, RaggedKVCache
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


def text_loglikelihoods(model: Transformer, tokenizer, pairs: Sequence[tuple[str, str]],
                        batch_size: int = 32) -> list[tuple[float, bool]]:
    """(log-likelihood, greedy) of each (context, continuation) text pair: lm-evaluation-harness'
    `loglikelihood`, as the harness model and the benchmarks call it."""
    encoded = [encode_pair(tokenizer, context, continuation) for context, continuation in pairs]
    return [(s.logprob, s.greedy) for s in score_requests(model, encoded, batch_size)]


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
    """The batch's contexts in one pass, then all their continuations in as few passes as the
    continuations' lengths allow, whatever their contexts' lengths.

    Contexts are right-padded: attention is causal, so padding after a context changes nothing
    before it, and its cached keys/values up to the context's own length are exact. Each
    continuation row then resumes from a copy of its context's keys/values in a ragged cache (its
    own position and mask, lmforge.engine.RaggedKVCache), so contexts of different lengths share a
    pass: a pass per context length made ARC's batches dozens of tiny passes.
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
    rows = [(index, g) for g, (_, members) in enumerate(batch) for index in members]
    out = []
    for chunk in _passes(rows, fitted, lengths, model.cfg.max_seq_len):
        owners = [g for _, g in chunk]
        continuations = [fitted[index][1] for index, _ in chunk]
        totals, greedy = _chunk_scores(model, cache, first, lengths, owners, continuations)
        out.extend((index, Score(total, ok)) for (index, _), total, ok in zip(chunk, totals, greedy, strict=True))
    return out


def _passes(rows: list[tuple[int, int]], fitted: list[tuple[list[int], list[int]]], lengths: list[int],
            window: int) -> list[list[tuple[int, int]]]:
    """(request, context) rows cut into passes: one-token continuations together (no pass of the
    model), the others longest first, a pass ending where a row's continuation is under 3/4 of the
    pass's longest (padded positions cost as much as real ones; HellaSwag's endings differ
    several-fold) or where the pass would outgrow the model's window (its longest context plus its
    longest continuation)."""
    def size(index: int) -> int:
        return len(fitted[index][1]) - 1  # tokens a continuation feeds to the model

    single = [row for row in rows if size(row[0]) == 0]
    multi = sorted((row for row in rows if size(row[0]) > 0), key=lambda row: -size(row[0]))
    passes = [single] if single else []
    chunk: list[tuple[int, int]] = []
    for row in multi:
        if chunk:
            longest = size(chunk[0][0])
            context = max(lengths[row[1]], *(lengths[g] for _, g in chunk))
            if size(row[0]) < 0.75 * longest or context + longest > window:
                passes.append(chunk)
                chunk = []
        chunk.append(row)
    return passes + ([chunk] if chunk else [])


def _chunk_scores(model: Transformer, cache: KVCache, first: torch.Tensor, lengths: list[int],
                  owners: list[int], continuations: list[list[int]]) -> tuple[list[float], list[bool]]:
    """Summed log-probability and greedy match of each continuation of one pass: its first token
    from its context's last logits (`first`), the rest from one forward pass of the continuations
    (minus their last token) after copies of their contexts' keys/values."""
    device = first.device
    owner = torch.tensor(owners, device=device)
    longest = max(len(c) for c in continuations)
    targets = torch.zeros(len(continuations), longest, dtype=torch.long, device=device)
    for r, cont in enumerate(continuations):
        targets[r, :len(cont)] = torch.tensor(cont, device=device)
    lens = torch.tensor([len(c) for c in continuations], device=device)
    valid = torch.arange(longest, device=device)[None, :] < lens[:, None]
    logits = first[owner].unsqueeze(1)  # (rows, 1, vocab) log-probabilities: predict token 0
    # Sums in float64: a long continuation of a random model sums to hundreds of nats, where
    # float32's spacing (6e-5 at 700) is near the tolerance the harness comparison allows.
    picked = logits.gather(2, targets[:, :1, None]).squeeze(2).squeeze(1).double()
    greedy = logits.argmax(-1).squeeze(1) == targets[:, 0]
    if longest > 1:
        # Only the real (not padded) positions go through the head: on a small model the head is
        # a large part of the pass, and padding is a large part of a pass of ragged endings.
        real = valid[:, 1:]
        hidden = _continue_pass(model, cache, [lengths[g] for g in owners], owner, targets[:, :-1])
        rest = model.head(model.norm(hidden[real])).float()  # (real tokens, vocab)
        target = targets[:, 1:][real]
        token_logp = rest.gather(1, target[:, None]).squeeze(1) - torch.logsumexp(rest, dim=-1)
        row = torch.arange(len(continuations), device=device)[:, None].expand_as(real)[real]
        picked = picked.index_add(0, row, token_logp.double())
        wrong = torch.zeros(len(continuations), dtype=torch.long, device=device).index_add(
            0, row, (rest.argmax(-1) != target).long())
        greedy &= wrong == 0
    return picked.tolist(), greedy.tolist()


def _continue_pass(model: Transformer, cache: KVCache, lengths: list[int], owner: torch.Tensor,
                   inputs: torch.Tensor) -> torch.Tensor:
    """One forward pass of right-padded continuation tokens `inputs` (rows, T), row r resuming
    after its context (`lengths[r]` tokens of cache row owner[r]): hidden states (rows, T, d)
    before the final norm. Padding runs after a row's tokens, which never see it."""
    longest = max(lengths)
    rows = RaggedKVCache(model.cfg, len(lengths), longest + inputs.shape[1], cache.k.device, cache.k.dtype)
    # KVCache and RaggedKVCache rows are both (layer, row, head, position, dim).
    rows.k[:, :, :, :longest] = cache.k[:, owner, :, :longest]
    rows.v[:, :, :, :longest] = cache.v[:, owner, :, :longest]
    rows.host_lengths = list(lengths)
    rows.use_rows(0, len(lengths))
    return model.hidden_states(inputs, rows)
