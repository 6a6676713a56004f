"""Generation: the KV cache, the sampling rule, the decode loop and the inference engine.

    prompt ids -> prefill (one pass, fills the KV cache) -> sample_next -> one-token step -> ...

`Engine` (the second half of this file) generates for everything that produces text: chat, the
server, `generate_text` (`lmforge sample`, the trainer's periodic samples, the pipeline's sample
stage) and evaluation. It batches many requests of different lengths over one `RaggedKVCache`,
with continuous batching, stop tokens and strings, streaming text and an optional compiled step.

`generate` (a batch of prompts, tensor in and out) and `stream` (one prompt, ids one at a time)
are the minimal decode loop under it: one `KVCache`, every row at one position, no text. They
stay as the tensor-level API (comparisons with transformers' `generate`, which has the same
shape) and as the independent truth the engine's tests check it against; `generate(compile=True)`
compiles `model.forward` with a dynamic cache length instead of the engine's batch buckets.
The model (lmforge/model.py) is the network alone: its forward accepts a cache object, nothing more.

Rules of `generate_text`:

- a prompt of "" (or one that encodes to nothing) starts a new document: the prompt is <|endoftext|>;
- generation stops at <|endoftext|> or any other chat control token (`STOP_TOKENS`; not included
  in the text);
- ids the tokenizer does not have (model.vocab_size may be padded past tokenizer.vocab_size) are
  never sampled;
- text is decoded incrementally from the byte stream, so a token that splits a UTF-8 character
  never produces a broken character in the middle of the text;
- a prompt longer than the model's context and non-finite sampling values are refused (UserError)
  before anything is generated; `Generation.stopped` says why generation ended, so a caller can
  tell the user when the context, not the model, ended the text.
"""

from __future__ import annotations

import codecs
import itertools
import math
import queue
import random
import threading
import time
import types
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.chat.format import CHAT_TOKENS, TOOL_TOKENS
from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model import Transformer, compute_dtype

# --------------------------------------------------------------------------------------------
# The key/value cache for incremental decoding


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    `pos` counts the positions filled so far, the same for every row. Writes go into slices in
    place; attention reads a view of the filled prefix, so decoding one token allocates no cache
    memory. Rows at different positions: `RaggedKVCache`.
    """

    ragged = False  # one position for the whole batch (see Transformer.hidden_states)

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, T, d) at positions pos..pos+T; return keys/values 0..pos+T."""
        end = self.pos + k.shape[2]
        # Under autocast the projections' outputs can differ in dtype from the cache (RoPE's fp32
        # tables promote k, v stays in the autocast dtype): store both in the cache's dtype.
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        # index_copy_ rather than slice assignment: under torch.compile it stays an in-place
        # write, where a slice assignment to a graph input costs a copy of the whole cache.
        positions = torch.arange(self.pos, end, device=k.device)
        self.k[layer].index_copy_(2, positions, k)
        self.v[layer].index_copy_(2, positions, v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


class RaggedKVCache:
    """A KV cache of `slots` rows, each at its own length: the engine's running batch.

    A forward acts on the rows `use_rows(lo, hi)` selected (a view, no copy). Token t of row b
    goes to position lengths[b] + t, with its RoPE angle and learned position taken from there;
    a query sees the keys of its own row up to its own position, so stale keys left behind by a
    longer earlier occupant of the slot, or by the padding of a ragged prefill, are never read.
    """

    ragged = True

    def __init__(self, cfg: ModelConfig, slots: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        # Each row's key/value heads apart, positions inside: a row's keys of one head lie in one
        # block, so (row, head) pairs merge into one batch dimension without a copy and attention
        # at one query per row is two batched products reading each key once (`attend`).
        shape = (cfg.n_layers, slots, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        # Each row's length, on the host only: a step's positions are made from it in one transfer,
        # and advancing or setting a length costs no device operation.
        self.host_lengths = [0] * slots
        self.device = torch.device(device)
        self.max_len = max_len
        self.lo, self.hi = 0, 0
        self._positions: torch.Tensor | None = None  # (B, T) of the forward in progress
        self._flat: torch.Tensor | None = None  # (B * kv_heads * T,) where each of their keys goes

    def use_rows(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    @property
    def pos(self) -> int:
        """The longest selected row: the model checks pos + T against its context."""
        return max(self.host_lengths[self.lo:self.hi], default=0)

    def positions(self, n: int) -> torch.Tensor:
        """(B, n) positions of the next n tokens of each selected row."""
        start = torch.tensor(self.host_lengths[self.lo:self.hi], device=self.device)[:, None]
        self._positions = start + torch.arange(n, device=start.device)
        self._flat = _flat_index(self.k, torch.arange(self.lo, self.hi, device=start.device)[:, None], self._positions)
        return self._positions

    def attention_mask(self, n: int) -> torch.Tensor | None:
        """(B, 1, n, keys): query t of row b sees keys 0..lengths[b] + t. None where the model's
        own rule is the same and faster: rows all at one length, with one new token each (it
        sees every key) or starting empty (causal; a ragged prefill's padding comes last)."""
        lengths = set(self.host_lengths[self.lo:self.hi])
        if len(lengths) == 1 and (n == 1 or lengths == {0}):
            return None
        keys = torch.arange(self.pos + n, device=self.device)
        return (keys[None, None, :] <= self._positions[:, :, None])[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, kv_heads, T, d) at each row's positions; return every row's keys/values
        up to the longest row's end (the mask hides the rest)."""
        self.write(layer, self._flat, k, v)
        end = self.pos + k.shape[2]
        return self.k[layer, self.lo:self.hi, :, :end], self.v[layer, self.lo:self.hi, :, :end]

    def write(self, layer: int, flat: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (..., kv_heads, T, d) of one layer where `flat` (`_flat_index`) says, in one
        in-place index_copy_ each."""
        for cache, new in ((self.k, k), (self.v, v)):
            cache[layer].view(-1, cache.shape[-1]).index_copy_(0, flat, new.to(cache.dtype).flatten(0, 2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of q (B, heads, T, d) over k, v (B, kv_heads, keys, d): SDPA, but at one
        query per row of a large batch (an eager decode step of many rows) two batched products,
        one (row, key/value head) pair a batch, which read each cached key once for all the query
        heads sharing it. SDPA's CPU kernel reads it once per query head, a row and head at a
        time: 4 layers of 64 rows took 3.2 ms against 2.9 (keys out of cache, as in a step);
        below ~16 rows SDPA's one call is the faster (benchmarks/RESULTS.md). Measured on CPU
        only: other devices keep their SDPA kernels."""
        B, heads, T, d = q.shape
        groups, keys = k.shape[1], k.shape[2]
        if T > 1 or B < BATCHED_DECODE_ATTENTION_ROWS or q.device.type != "cpu":
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                                  enable_gqa=groups != heads)
        per = heads // groups  # query head h reads key/value head h // per, as SDPA's GQA
        q = q.to(k.dtype).reshape(B * groups, per, d)
        scores = torch.bmm(q, k.reshape(B * groups, keys, d).transpose(1, 2)).view(B, groups, per, keys)
        scores.mul_(d ** -0.5)
        if mask is not None:  # (B, 1, 1, keys)
            scores.masked_fill_(~mask, float("-inf"))
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype).view(B * groups, per, keys)  # bf16: fp32 sums
        return torch.bmm(weights, v.reshape(B * groups, keys, d)).view(B, heads, 1, d)

    def advance(self, n: int) -> None:
        for row in range(self.lo, self.hi):
            self.host_lengths[row] += n

    def set_length(self, row: int, length: int) -> None:
        self.host_lengths[row] = length

    def copy_row(self, src: int, dst: int) -> None:
        """Row `dst` becomes a copy of row `src` (fan-out of a prompt, compaction of the batch)."""
        end = self.host_lengths[src]
        self.k[:, dst, :, :end] = self.k[:, src, :, :end]
        self.v[:, dst, :, :end] = self.v[:, src, :, :end]
        self.set_length(dst, end)


def _flat_index(cache: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Where the keys of tokens at `positions` (..., T) of cache `rows` (broadcast to them) go in
    one layer of a ragged cache (slots, kv_heads, max_len, d) seen as (slots * kv_heads * max_len,
    d): flattened in the order of k (..., kv_heads, T, d), so a write is one in-place index_copy_."""
    heads, max_len = cache.shape[2], cache.shape[3]
    head = torch.arange(heads, device=positions.device)[:, None]
    return ((rows[..., None, :] * heads + head) * max_len + positions[..., None, :]).flatten()


class _DecodeView:
    """A `RaggedKVCache` as the engine's compiled decode step sees it: static shapes but one.

    One new token per row at `positions` (B, 1); rows 0..B of the cache, each read over the first
    `keys` positions (the mask's last size) with the mask (B, 1, 1, keys) hiding what lies past
    its own position. The batch size never varies inside a graph (one graph per batch size
    bucket); `keys` is the one dynamic size, so a short batch attends over its own length, not the
    cache's (attention over the whole cache made a compiled 16-row step slower than eager), and
    one graph serves every length. `pos` is 0: the context check has nothing to do, a row never
    passes max_seq_len."""

    ragged = True
    pos = 0

    def __init__(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> None:
        self.k, self.v, self._positions, self._mask = k, v, positions, mask
        self.rows = torch.arange(positions.shape[0], device=positions.device)

    def positions(self, n: int) -> torch.Tensor:
        return self._positions

    def attention_mask(self, n: int) -> torch.Tensor:
        return self._mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # index_put_ on the whole buffer at (layer, row, position): inductor writes just those
        # entries in place. An index_copy_ into a view of the layer made it rewrite the whole
        # layer's cache every step (the 17 tok/s of a first attempt).
        # The aten op: its index list takes None for the heads (every head), which Tensor's does not.
        index = [torch.tensor(layer, device=k.device), self.rows, None, self._positions[:, 0]]
        torch.ops.aten.index_put_(self.k, index, k[:, :, 0].to(self.k.dtype))  # (B, kv_heads, d)
        torch.ops.aten.index_put_(self.v, index, v[:, :, 0].to(self.v.dtype))
        B, keys = self.rows.shape[0], self._mask.shape[-1]
        return self.k[layer, :B, :, :keys], self.v[layer, :B, :, :keys]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of the one query per row, q (B, heads, 1, d), over k, v (B, kv_heads, keys, d):
        plain products and sums that inductor fuses into a few loops over the batch's own keys.
        SDPA's kernel at one query per row took about twice as long inside the compiled step
        (benchmarks/RESULTS.md)."""
        B, heads, _, d = q.shape
        groups = k.shape[1]  # query head h reads key/value head h // (heads // groups), as SDPA's GQA
        q = q.reshape(B, groups, heads // groups, 1, d)
        scores = (q * k[:, :, None]).sum(-1) * d ** -0.5  # (B, groups, heads per group, keys)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)
        return (weights[..., None] * v[:, :, None]).sum(-2).reshape(B, heads, 1, d)

    def advance(self, n: int) -> None:
        pass  # the engine advances the RaggedKVCache itself


class _PackedPrefill:
    """A `RaggedKVCache` as a packed prefill sees it: the prompts of cache rows lo.. laid end to
    end in one row of T tokens, no padding. The projections and MLPs run once over all of them
    (one forward, full-width matrix products); attention runs causally within each prompt
    (`attend`, SDPA per prompt), and token t of a prompt is written to its row's position t.
    Right-padded groups of similar lengths cost a forward each plus their padding: 16 prompts
    of 8..64 tokens took four forwards and 7% padding (benchmarks/RESULTS.md)."""

    ragged = True

    def __init__(self, cache: RaggedKVCache, lo: int, lengths: Sequence[int]) -> None:
        self.cache = cache
        device = cache.k.device
        self._positions = torch.cat([torch.arange(n, device=device) for n in lengths])[None]  # (1, T)
        rows = torch.arange(lo, lo + len(lengths), device=device).repeat_interleave(torch.tensor(lengths, device=device))
        self._flat = _flat_index(cache.k, rows, self._positions[0])
        ends = list(itertools.accumulate(lengths))
        self.bounds = list(zip([0, *ends[:-1]], ends, strict=True))
        # The model checks pos + T against its context; T is the sum of the prompts, each of which
        # fits (checked at submit): pos puts the check on the longest one.
        self.pos = max(lengths) - ends[-1]

    def positions(self, n: int) -> torch.Tensor:
        return self._positions

    def attention_mask(self, n: int) -> None:
        return None  # `attend` keeps each prompt to itself

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (1, kv_heads, T, d) at each token's row and position; attention reads them
        as they are (a prompt's keys are its own tokens)."""
        self.cache.write(layer, self._flat, k, v)
        return k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: None) -> torch.Tensor:
        """Causal attention of each prompt's queries over its own keys: q (1, heads, T, d)."""
        gqa = k.shape[1] != q.shape[1]
        return torch.cat([F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], is_causal=True,
                                                         enable_gqa=gqa) for a, b in self.bounds], dim=2)

    def advance(self, n: int) -> None:
        pass  # the engine sets each row's length itself


def _step_logits(model: nn.Module, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                 positions: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
    """Logits (B, model vocab) of one new token per row (tokens, positions: (B, 1)), cache rows
    0..B, keys `key_index` (0, 1, ... keys - 1), each row reading those up to its own position."""
    mask = (key_index <= positions)[:, None, None, :]
    return model(tokens, _DecodeView(k, v, positions, mask), last_only=True)[:, -1]


def _decode_greedy(model: nn.Module, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                   positions: torch.Tensor, key_index: torch.Tensor, vocab: int,
                   steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled greedy graph: `steps` greedy steps in one call, each feeding every row's
    token (the argmax among ids < `vocab`) to the next one. Returns the tokens (B, steps) and the
    last step's logits (what logprobs read, at steps=1).

    The argmax is computed here because the compiled argmax is a vectorised loop where eager
    argmax over 16 rows of 4,096 logits took ~0.1 ms, 5% of a 16-row step. Several steps a call
    (`Engine.greedy_run`) pay dynamo's entry and guards and the engine's work between steps once
    per run, and the later steps find the weights still in the CPU's caches: at 4 steps a call a
    generate of 16 ragged rows took ~17% less time, of one row ~36% less (benchmarks/RESULTS.md).
    The engine keeps each row's tokens up to the one that ends it and sets its cache length
    there; what a row wrote past that is never read."""
    chosen = []
    for step in range(steps):
        at = positions + step
        logits = _step_logits(model, k, v, tokens, at, key_index)
        tokens = logits[:, :vocab].argmax(dim=-1, keepdim=True)
        chosen.append(tokens)
    return logits, torch.cat(chosen, dim=1)


def _decode_sampled(model: nn.Module, k: torch.Tensor, v: torch.Tensor, tokens: torch.Tensor,
                    positions: torch.Tensor, key_index: torch.Tensor, vocab: int, inv_temperature: torch.Tensor,
                    uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The compiled step of a batch with sampled rows: `_step_logits` and each row's draw, the
    eager sampler's rule for a row without top-k / top-p (`_draw` of the logits times
    inv_temperature[b] at uniform[b]: the same operations on the same numbers, so the same
    token up to float rounding). Only rows with inv_temperature[b] > 0 mean anything; the engine
    picks the others' tokens itself. Drawing inside the graph saves a rollout step the eager
    sampler's dozen kernels and their Python (benchmarks/RESULTS.md)."""
    logits = _step_logits(model, k, v, tokens, positions, key_index)
    return logits, _draw(logits[:, :vocab].float() * inv_temperature[:, None], uniform)


def _own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own. Dynamo keeps its graphs on the code object, at most 8
    (its recompile limit): a second compiled Engine over another model shape would add its
    buckets' graphs to the first one's, pass the limit and run eagerly, with only a warning.
    Each Engine's step is its own function to dynamo instead."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _key_length(longest: int, max_len: int) -> int:
    """The keys a compiled step attends over: past the longest row's new token, rounded up to a
    multiple of KEY_BUCKET (fewer distinct shapes), at most the context."""
    return min(-(-(longest + 1) // KEY_BUCKET) * KEY_BUCKET, max_len)


BATCHED_DECODE_ATTENTION_ROWS = 16  # from this many rows a decode step's attention is RaggedKVCache.attend's

PACKED_HEAD_ROWS = 16  # from this many rows an eager decode step's LM head is `_PackedHead`'s

KEY_BUCKET = 16  # small: attention is most of what a longer key length costs; one graph serves all


# --------------------------------------------------------------------------------------------
# Sampling


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None,
                vocab_limit: int | None = None) -> torch.Tensor:
    """Pick the next token from logits (B, vocab) -> (B,): greedy at temperature 0, else sampled
    from the softmax at `temperature`, restricted to the `top_k` best and the smallest set whose
    probability reaches `top_p` (nucleus).

    `vocab_limit` keeps ids >= it out of reach: a model's vocabulary may be larger than its
    tokenizer's (padded to a fast matmul size, or a tokenizer that ran out of merges), and those
    rows mean nothing and cannot be decoded."""
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[..., :vocab_limit]  # ids keep their value: the kept rows come first
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
    except RuntimeError as e:  # NaN/inf logits from finite weights: e.g. an fp16/bf16 overflow
        if torch.isfinite(probs).all():
            raise
        raise UserError(NON_FINITE) from e


NON_FINITE = ("the model produced non-finite logits (NaN or inf), so no token can be sampled: its "
              "activations overflow in this dtype, or its weights are broken")


def sample_rows(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
                top_p: Sequence[float], uniform: Sequence[float],
                scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Sample one token per row of logits (B, vocab) -> (B,), each row with its own rules, in
    batched passes: the engine's sampler. Row b is drawn from the softmax at `temperature[b]`
    (> 0), restricted to its `top_k[b]` best (0: all) and then to the smallest set whose
    probability reaches `top_p[b]` (1: all), by inverting its CDF at `uniform[b]` in [0, 1).

    The randomness is the caller's one number per row, so a row's token depends on its logits,
    rules and number only, never on the other rows of the batch (each request keeps its own
    seeded generator; a multinomial call per row cost ~40% of a rollout's time). Rows with a
    filter invert the CDF in ranked order, rows without one in id order (no sort), each kind in
    one pass of its own, so that too is the row's own business. A row whose logits are not
    finite gets -1. `scratch`: two float32 tensors shaped like logits that rows without a
    filter may use for their scaled logits and weights (the engine reuses them, see
    `Engine._buffer`)."""
    ranked = [_filters(k, p, logits.shape[-1]) for k, p in zip(top_k, top_p, strict=True)]
    if not any(ranked):
        return _invert_cdf(logits, temperature, top_k, top_p, uniform, ranked=False, scratch=scratch)
    if all(ranked):
        return _invert_cdf(logits, temperature, top_k, top_p, uniform, ranked=True)
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for kind in (False, True):
        rows = [b for b, r in enumerate(ranked) if r == kind]
        out[rows] = _invert_cdf(logits[rows], *([seq[b] for b in rows]
                                                for seq in (temperature, top_k, top_p, uniform)),
                                ranked=kind)
    return out


def _filters(top_k: int, top_p: float, vocab: int) -> bool:
    """Whether top-k (0: none) or top-p (1: none) leaves out any of `vocab` ids: the row is then
    drawn in ranked order (`_invert_cdf`), not inside the compiled step."""
    return 0 < top_k < vocab or top_p < 1


def _invert_cdf(logits: torch.Tensor, temperature: Sequence[float], top_k: Sequence[int],
                top_p: Sequence[float], uniform: Sequence[float], ranked: bool,
                scratch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`sample_rows` for rows of one kind: `ranked` sorts them and applies their filters."""
    device, vocab = logits.device, logits.shape[-1]
    scaled = logits.float()
    if any(t != 1 for t in temperature):  # x * 1.0 is x: rollouts at temperature 1 skip a pass
        inverse = torch.tensor([1 / t for t in temperature], device=device)[:, None]
        scaled = torch.mul(scaled, inverse, out=scratch[0]) if scratch is not None else scaled * inverse
    order = None
    if ranked:
        scaled, order = torch.sort(scaled, dim=-1, descending=True)
        keep = torch.tensor([k if 0 < k < vocab else vocab for k in top_k], device=device)
        scaled = scaled.masked_fill(torch.arange(vocab, device=device) >= keep[:, None], float("-inf"))
        probs = scaled.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the best always stays);
        # a row without top-p never drops one, whatever the rounding of its cumulative sum.
        reach = torch.tensor([p if p < 1 else math.inf for p in top_p], device=device)
        scaled = scaled.masked_fill(probs.cumsum(dim=-1) - probs >= reach[:, None], float("-inf"))
    drawn = _draw(scaled, torch.tensor(uniform, device=device), None if scratch is None else scratch[1])
    if order is None:
        return drawn
    return torch.where(drawn >= 0, order.gather(1, drawn.clamp(min=0)[:, None])[:, 0], -1)


def _draw(scaled: torch.Tensor, uniform: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Invert each row's CDF of softmax(scaled) (B, V) at uniform[b] in [0, 1): the index
    (B,), or -1 for a row whose values are not finite. One rule for the eager sampler and the
    compiled step (`_decode_sampled`). `out`: a tensor shaped like `scaled` for the weights.

    In two levels, the block of CDF_BLOCK ids holding the target, then the id inside it: a
    running sum over V ids is a scalar loop (~0.6 ms for 64 rows of 4,096 ids, as much as a
    layer's attention), over V / CDF_BLOCK block sums and one block far less."""
    B, V = scaled.shape
    # softmax, not exp of the difference to the row's maximum: ATen's one kernel took 150 us at
    # 64 rows of 4,096 ids against 270 us for amax, sub and exp (its exp is the slower, more
    # exact one). The weights then sum to ~1; u scales to their total all the same.
    weights = scaled.softmax(dim=-1) if out is None else torch.softmax(scaled, dim=-1, out=out)
    if V % CDF_BLOCK:
        weights = F.pad(weights, (0, -V % CDF_BLOCK))  # the padding weighs 0
    blocks = weights.view(B, -1, CDF_BLOCK)
    ends = blocks.sum(dim=-1).cumsum(dim=-1)  # (B, blocks): the CDF at each block's end
    total = ends[:, -1:]
    # u < 1 - 2^-23 keeps u * total below the total in float32 rounding.
    target = uniform.to(ends.dtype).clamp(max=1 - 2**-23)[:, None] * total
    # The first block ending past the target: its sum is > 0, since its end exceeds the one before.
    block = torch.searchsorted(ends, target, right=True).clamp(max=ends.shape[1] - 1)  # clamp: NaN rows
    start = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, block[:, :, None].expand(B, 1, CDF_BLOCK))[:, 0].cumsum(dim=-1)
    # The target inside the block, kept below the block's own running total (its sum, rounded
    # differently): the first id past it then always has a non-zero weight.
    rest = torch.minimum((target - start).clamp(min=0), inner[:, -1:] * (1 - 2**-23))
    index = block * CDF_BLOCK + torch.searchsorted(inner, rest, right=True).clamp(max=CDF_BLOCK - 1)
    return torch.where(torch.isfinite(total), index.clamp(max=V - 1), -1)[:, 0]


CDF_BLOCK = 64  # ids per block of `_draw`'s two-level inverse CDF


# --------------------------------------------------------------------------------------------
# The decode loop


@torch.inference_mode()
def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
             compile: bool = False, vocab_limit: int | None = None) -> torch.Tensor:
    """Continue each row of `idx` (B, T) by up to `max_new_tokens`; returns (B, T + new).

    temperature 0 is greedy. A row that emits a stop token keeps it and is padded with it
    afterwards; generation ends early once every row has stopped. `compile` runs the
    one-token decode step through torch.compile: worth it for long generations (the first
    call compiles for tens of seconds; later calls reuse it), see docs/guide/model.md.
    `vocab_limit`: only ids below it are ever picked (see `sample_next`).
    """
    stops = torch.tensor(list(stop_tokens), dtype=idx.dtype, device=idx.device)
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    out = [idx]
    for token in _decode(model, idx, max_new_tokens, temperature, top_k, top_p, generator, compile,
                         vocab_limit):
        if len(stops):
            token = torch.where(done, stops[0], token)
            done |= torch.isin(token, stops)
        out.append(token[:, None])
        if len(stops) and bool(done.all()):
            break
    return torch.cat(out, dim=1)


@torch.inference_mode()
def stream(model: nn.Module, prompt_ids: Sequence[int] | torch.Tensor, max_new_tokens: int,
           temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
           compile: bool = False, vocab_limit: int | None = None) -> Iterator[int]:
    """Yield new token ids one at a time for one prompt; stops before yielding a stop token.
    Text generation with a tokenizer goes through `generate_text`."""
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).view(1, -1)
    stops = set(stop_tokens)
    for token in _decode(model, idx, max_new_tokens, temperature, top_k, top_p, generator, compile,
                         vocab_limit):
        t = int(token[0])
        if t in stops:
            return
        yield t


def _decode(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, temperature: float,
            top_k: int | None, top_p: float | None, generator: torch.Generator | None,
            compile: bool = False, vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
    """Prefill the cache with the prompt, then yield (B,) next tokens one step at a time."""
    cfg = model.cfg
    B, T = idx.shape
    if not 0 < T <= cfg.max_seq_len:
        raise ValueError(f"a prompt of {T} tokens; need 1 to model.max_seq_len={cfg.max_seq_len}")
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - T)  # the context ends there
    if max_new_tokens <= 0:
        return
    param = next(model.parameters())
    cache_len = cfg.max_seq_len if compile else T + max_new_tokens  # see _compiled_step
    # Keys and values come out of the projections in the autocast dtype when autocast is on
    # (the trainer samples under bf16 autocast on GPUs): cache them in that dtype.
    cache = KVCache(cfg, B, cache_len, param.device, compute_dtype(param.device.type, param.dtype))
    step = _compiled_step(model) if compile else model
    logits = model(idx, cache, last_only=True)[:, -1]  # the prompt, in one eager pass
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, top_p, generator, vocab_limit)
        yield token
        if i + 1 < max_new_tokens:
            logits = step(token[:, None], cache, last_only=True)[:, -1]


# One compiled decode step per model, held here (not on the model) and dropped with the model.
_COMPILED_STEPS: weakref.WeakKeyDictionary[nn.Module, Callable] = weakref.WeakKeyDictionary()


def _compile_options(device: torch.device) -> dict:
    """On CPU the C++ wrapper calls the kernels without Python in between (most of a small
    model's step otherwise)."""
    return {"cpp_wrapper": True} if device.type == "cpu" else {}


def _compiled_step(model: nn.Module) -> Callable:
    """The model's forward compiled for one-token steps. The first step specialises on the cache
    position, the second recompiles with the position as a dynamic size; from then on one graph
    serves every step and every prompt (the cache always spans model.max_seq_len, so its shape
    never changes). On CPU the C++ wrapper removes most per-kernel Python cost."""
    if model not in _COMPILED_STEPS:
        _COMPILED_STEPS[model] = torch.compile(model.forward,
                                               options=_compile_options(next(model.parameters()).device))
    return _COMPILED_STEPS[model]


# --------------------------------------------------------------------------------------------
# Text in, text out


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


def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int,
                  temperature: float = 0.8, top_k: int | None = 50, top_p: float | None = None,
                  seed: int = 0, on_text: Callable[[str], None] | None = None,
                  compile: bool = False) -> Generation:
    """Continue `prompt` by up to `max_new_tokens` tokens with `model` (a `Transformer`), through
    a one-row `Engine`: the same rules as chat and serving.

    temperature 0 is greedy; top_k None/0 and top_p None/1 disable those filters. The sampling
    generator lives on the model's device, seeded with `seed`. `on_text` receives each decoded
    piece as it is produced (for streaming to a terminal). `compile`: the Engine's compiled
    decode step (tens of seconds to compile the first time; for long generations).
    """
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    max_seq_len = model.cfg.max_seq_len
    ids = prompt_ids(tokenizer, prompt, max_seq_len)
    if max_new_tokens == 0:
        return Generation("", [], "max_new_tokens")
    pieces: list[str] = []
    new_ids: list[int] = []
    finish: list[str | None] = []

    def on_event(event: Event) -> None:  # called as the engine steps, in this thread
        new_ids.extend(event.token_ids)
        finish.append(event.finish_reason)
        if event.text:
            pieces.append(event.text)
            if on_text is not None:
                on_text(event.text)

    was_training = model.training
    try:
        engine = Engine(model, tokenizer, max_batch=1, compile=compile)
        engine.submit(ids, SamplingParams(max_tokens=max_new_tokens, temperature=temperature,
                                          top_k=top_k or None, top_p=top_p, seed=seed), on_event)
        while engine.step():
            pass
    finally:
        model.train(was_training)
    if finish[-1] == "stop":
        stopped = "end_of_text"
    elif len(new_ids) >= max_new_tokens:
        stopped = "max_new_tokens"
    else:
        stopped = "context"
    return Generation("".join(pieces), new_ids, stopped)


# --------------------------------------------------------------------------------------------
# The engine: continuous batching of many requests over one ragged KV cache

# The largest batch the compiled decode step serves by default: on the tiny preset on CPU it
# was 1.9x the eager step at batch 1, 1.1-1.4x at 4, and 1.3x at 16 once it attended over the
# batch's own key length rather than the whole cache (benchmarks/RESULTS.md).
COMPILE_MAX_BATCH = 16

# Greedy steps a compiled call runs when every row is greedy (`_decode_greedy`): at 4, 16 ragged
# rows of the tiny preset decoded 2.4-2.9x transformers' `generate` on CPU where one step a call
# gave 2.3-2.4x in the same runs, and one row 5.3-5.8x where it gave 3.4-3.9x; 8 was no better
# than 4 and 2 gained a third as much (benchmarks/RESULTS.md).
GREEDY_RUN = 4

# Every chat control token ends an answer: <|end|> (the turn's end) and <|endoftext|> (the
# document's), and a role token, which means the model began the next turn itself. None of them
# is ever sent as text.
STOP_TOKENS: tuple[str, ...] = CHAT_TOKENS


@dataclass
class SamplingParams:
    """How one request is continued. temperature 0 is greedy; top_k None/0 and top_p None/1
    disable those filters; `seed` None draws a fresh one; `n` samples share one prefill;
    `logprobs` adds each token's log-probability and its `top_logprobs` best alternatives."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: Sequence[str] = ()
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def filter_values(self) -> tuple[int, float]:
        """(top_k, top_p) as `sample_rows` takes them: 0 and 1 for a filter that is off."""
        return self.top_k or 0, 1.0 if self.top_p is None else self.top_p


@dataclass
class TokenLogprob:
    """A generated token's log-probability under the model (temperature 1) and the best ones."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Event:
    """What one of a request's `n` sequences produced in one step: new text (whole characters,
    never part of a stop string), its tokens, and `finish_reason` ("stop", "length") on the last.
    `forced`: its token was a calculator result written into the answer, not sampled."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None
    forced: bool = False


@dataclass
class Completion:
    """One finished sequence: its text, tokens, log-probabilities and why it ended."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str


class Request:
    """A submitted request: iterate it for its `Event`s (from any thread), `cancel` it to free
    its rows, or `result()` to wait for its completions. With `on_event` the events go to that
    callable instead (the server forwards them to its event loop) and iterating is not possible.

    `stream` False: nobody reads the text before a sequence ends (`result()`, rollouts), so the
    engine decodes it once at the end (per token only for stop strings) and sends few events:
    one per run of sampled or of forced tokens, the last with the whole text and the
    `finish_reason`. The completions are the same; what is saved is per-token host work."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams,
                 on_event: Callable[[Event | BaseException], None] | None = None, stream: bool = True) -> None:
        self.prompt_ids = prompt_ids
        self.params = params
        self.stream = stream
        self.cancelled = False
        self._events: queue.SimpleQueue[Event | BaseException] = queue.SimpleQueue()
        self._put = on_event or self._events.put  # called on the engine's thread
        # 1 / temperature where the compiled sampled step draws this request's rows, else 0
        # (greedy, or top-k / top-p, which `sample_rows` draws): set by `Engine.submit`.
        self.graph_inv_temperature = 0.0

    def cancel(self) -> None:
        self.cancelled = True  # the engine drops its rows at its next step

    def __iter__(self) -> Iterator[Event]:
        running = self.params.n
        while running:
            event = self._events.get()
            if isinstance(event, BaseException):
                raise RuntimeError("generation failed") from event
            running -= event.finish_reason is not None
            yield event

    def result(self) -> list[Completion]:
        parts: list[list[Event]] = [[] for _ in range(self.params.n)]
        for event in self:
            parts[event.index].append(event)
        return [Completion(i, "".join(e.text for e in events), [t for e in events for t in e.token_ids],
                           [lp for e in events for lp in e.logprobs], events[-1].finish_reason or "")
                for i, events in enumerate(parts)]


class _Sequence:
    """One row of the running batch: a request's sample `index`, its text so far and the token
    waiting to be fed to the model."""

    def __init__(self, request: Request, index: int) -> None:
        self.request, self.index = request, index
        seed = request.params.seed
        # The row's own generator: one uniform number per sampled token (see `sample_rows`), on
        # the host, so it costs no device op; the n samples of one seed differ, reproducibly.
        self.rng = random.Random(None if seed is None else seed + index)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.emitted = 0  # characters of `text` already sent
        self.token_ids: list[int] = []
        self.pending: int = 0  # the last sampled token, fed at the next decode step
        self.finished = False
        self.tool_start: int | None = None  # where the open calculator call's expression starts
        self.forced: list[int] = []  # a tool result's tokens, emitted before sampling again
        self.chunk: Event | None = None  # a request without `stream`: its tokens not yet sent


class _PackedHead:
    """The LM head's product at an eager decode step of many rows (CPU, float32) with the weight
    reordered once into oneDNN's blocked layout: the tiny preset's 4,096 x 128 head at 64 rows
    738 -> 614 us, at 16 rows 233 -> 173 us (benchmarks/RESULTS.md); one packing serves every
    row count. The weight may change between generations (GRPO trains it between rollouts), and
    not every update says so: fused AdamW leaves the version counter as it was. So the engine
    `forget`s the packing whenever it goes idle, and it is made again when the weight is another
    tensor or its version counter moved (an in-place update while rows run, load_state_dict).
    Inference tensors keep no version counter, so they are never packed (`usable`). Where this
    build of torch cannot pack (oneDNN's linear missing on some platforms), the first attempt
    says so and every later step takes the plain head."""

    unsupported = False  # set, for the process, when packing failed once

    def __init__(self) -> None:
        self._weight: weakref.ref | None = None
        self._version = -1
        self._packed: torch.Tensor | None = None

    @staticmethod
    def usable(model: nn.Module, h: torch.Tensor) -> bool:
        """Whether the head of `model` at hidden states h (rows, d_model) is a plain product this
        can take over: a `Transformer`'s own head (not replaced, no adapter, no bias) on a float32
        CPU weight, outside autocast."""
        if (_PackedHead.unsupported or h.dim() != 2 or h.shape[0] < PACKED_HEAD_ROWS or h.device.type != "cpu"
                or h.dtype != torch.float32 or not torch.backends.mkldnn.is_available() or torch.is_autocast_enabled("cpu")
                or getattr(model.head, "__func__", None) is not Transformer.head):
            return False
        if model.lm_head is not None and (type(model.lm_head) is not nn.Linear or model.lm_head.bias is not None):
            return False
        weight = model.head_weight()
        return weight.dtype == torch.float32 and weight.device.type == "cpu" and not weight.is_inference()

    def forget(self) -> None:
        self._weight, self._packed = None, None

    def __call__(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self._weight is None or self._weight() is not weight or weight._version != self._version:
            try:
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), h.shape[0])
            except (RuntimeError, AttributeError, NotImplementedError):  # no oneDNN linear here
                _PackedHead.unsupported = True
                return F.linear(h, weight)
            self._weight, self._version = weakref.ref(weight), weight._version
        return torch.ops.mkldnn._linear_pointwise(h, self._packed, None, "none", [], "")


class Engine:
    """Generates for many requests at once, the only place that samples tokens for chat and
    serving.

    Each request's prompt is prefilled once (new requests together, as one right-padded batch)
    and fanned out to its `n` rows; then every step feeds each running row its last token in one
    batched forward over a `RaggedKVCache` and samples the next one with that request's own rules
    and generator (all rows drawn at once, `sample_rows`). Requests join at any step when rows are free and leave as soon as they finish,
    so a long answer never holds up short ones (continuous batching).

    `submit` is thread-safe. `start()` runs the steps on a background thread (the server);
    without it, `generate` steps in the caller's thread (tests, benchmarks, scripts).

    `compile` runs the decode step of up to `compile_max_batch` rows through torch.compile (a
    `_DecodeView` of the cache, the batch padded to a power of two, the keys cut at the longest
    row rounded up to a multiple of 16): on CPU about 2-3x the eager step at batch 1, where a
    small model's step is mostly per-operation overhead, ~1.3x at 8 to 16 rows and ~1.3x at 64
    sampled rows. Three graphs per batch size: a greedy step; a run of `greedy_run` greedy
    steps in one call, used while every row is greedy, without logprobs and with room in the
    context for the whole run (a request that arrives meanwhile joins after the run); and a step
    with sampled rows, whose rows sampled at a temperature are drawn inside the graph
    (`_decode_sampled`). Each graph compiles at its first step, or all of them in `warm_up()`
    (5-20 s each on a 2-core machine, far less once torch's on-disk cache has them);
    `compile_seconds` says how long. Off by default; `lmforge serve` and an interactive
    `lmforge chat` turn it on on CPU, `grpo.compile` for rollouts.
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch: int = 16, compile: bool = False,
                 compile_max_batch: int = COMPILE_MAX_BATCH, greedy_run: int = GREEDY_RUN) -> None:
        self.model = model.eval()
        self.cfg: ModelConfig = model.cfg
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.stop_ids = {tokenizer.special_tokens[t] for t in STOP_TOKENS if t in tokenizer.special_tokens}
        specials = tokenizer.special_tokens
        self.tool_ids = (tuple(specials[t] for t in TOOL_TOKENS)
                         if all(t in specials for t in TOOL_TOKENS) else None)
        param = next(model.parameters())
        self.device = param.device
        # One position more than the context, never written: a compiled step's key slice then
        # never spans the whole cache, which torch.compile would otherwise specialise a graph on.
        self.cache = RaggedKVCache(self.cfg, max_batch, self.cfg.max_seq_len + 1, param.device,
                                   compute_dtype(param.device.type, param.dtype))
        # The compiled decode step: one graph per batch size bucket (1, 2, 4, ... up to
        # `compile_max_batch`), each compiled on first use, the key length dynamic inside it;
        # larger batches run eagerly, where the matrix products dominate.
        self.compile_max_batch = min(compile_max_batch, max_batch) if compile else 0
        # Three graphs per bucket, each compiled on first use: a greedy step and a run of
        # `greedy_run` greedy steps (`_decode_greedy`, one code object each: dynamo keeps at most
        # 8 graphs per code object), and a step with sampled rows (`_decode_sampled`, which draws
        # them inside the graph).
        self.greedy_run = greedy_run if compile else 1
        options = _compile_options(self.device)
        self._compiled = {kind: torch.compile(_own_copy(fn), dynamic=False, options=options) if compile else None
                          for kind, fn in (("greedy", _decode_greedy), ("run", _decode_greedy),
                                           ("sampled", _decode_sampled))}
        self._compiled_buckets: set[tuple[int, str]] = set()  # (batch size, kind) compiled so far
        # Set by a caller that steps the engine inside torch.compiler.set_stance("force_eager")
        # (alignment's `generating`: the training-compiled blocks run eagerly for the prefill);
        # the compiled step then still runs compiled (dynamo inlines those blocks into it).
        self.in_eager_region = False
        self.compile_seconds = 0.0  # time spent compiling so far (the first step of each bucket)
        self.rows: list[_Sequence] = []  # rows[i] lives in row i of the cache
        self._buffers: dict[str, torch.Tensor] = {}  # see `_buffer`
        self._packed_head = _PackedHead()
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- submitting

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               on_event: Callable[[Event | BaseException], None] | None = None, stream: bool = True) -> Request:
        """Queue a request; it joins the running batch at the next step with enough free rows.
        `on_event`, `stream`: see `Request`."""
        if not 0 < len(prompt_ids) <= self.cfg.max_seq_len:
            raise ValueError(f"a prompt of {len(prompt_ids)} tokens; need 1 to {self.cfg.max_seq_len}")
        if not 1 <= params.n <= self.max_batch:
            raise ValueError(f"n={params.n}; need 1 to the engine's max_batch={self.max_batch}")
        request = Request(list(prompt_ids), params, on_event, stream)
        if params.temperature > 0 and not _filters(*params.filter_values, self.tokenizer.vocab_size):
            request.graph_inv_temperature = 1 / params.temperature
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()
        return request

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> list[list[Completion]]:
        """Every prompt's completions, batched; steps in this thread unless `start()` was called."""
        requests = [self.submit(p, params, stream=False) for p in prompts]
        if self._thread is None:
            while self.step():
                pass
        return [r.result() for r in requests]

    def load(self) -> tuple[int, int]:
        """(rows generating, requests waiting): a snapshot for health checks."""
        return len(self.rows), len(self._waiting)

    # ---- the background loop

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._waiting or self.rows or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # fail the requests in flight, keep serving
                for request in {s.request for s in self.rows} | set(self._waiting):
                    request._put(error)
                self.rows, self._waiting = [], deque()

    # ---- one step

    @torch.inference_mode()
    def step(self) -> bool:
        """Decode one token for every running row (or a run of `greedy_run`, see
        `_greedy_run_fits`), then admit waiting requests; returns whether any work is left."""
        self._drop_finished()
        if self.rows and self._greedy_run_fits():
            self._decode_greedy_run()
            self._drop_finished()
        elif self.rows:
            uniform = self._uniform(self.rows)
            logits, chosen, decided = self._decode(uniform)
            self._sample(self.rows, logits, chosen, decided, uniform)
            self._drop_finished()
        if not self.rows:  # idle: the weights may be trained before the next rows (`_PackedHead`)
            self._packed_head.forget()
        self._admit()
        with self._wake:
            return bool(self.rows or self._waiting)

    def _decode(self, uniform: list[float | None]) -> tuple[torch.Tensor, torch.Tensor | None, list[bool]]:
        """Feed every running row its pending token: (rows, vocab) logits of the next one, the
        compiled step's tokens (None from an eager step) and which rows they decided: all the
        greedy rows (a greedy step), or the rows drawn at `uniform` (see `_uniform`) without
        top-k / top-p (a step with such rows)."""
        n = len(self.rows)
        self.cache.use_rows(0, n)
        if n > self.compile_max_batch:
            tokens = torch.tensor([s.pending for s in self.rows], device=self.device)[:, None]
            h = self.model.norm(self.model.hidden_states(tokens, self.cache)[:, -1])
            if _PackedHead.usable(self.model, h):
                return self._packed_head(h, self.model.head_weight()), None, []
            return self.model.head(h, out=self._buffer("logits", h)), None, []
        tokens, positions, lengths, pad = self._padded_rows()
        # 0 for rows the graph does not draw: greedy, forced, or filtered (`sample_rows` draws those).
        inv_temperature = [0.0 if u is None else s.request.graph_inv_temperature
                           for s, u in zip(self.rows, uniform, strict=True)]
        sampling, decided = None, [u is None for u in uniform]
        if any(inv_temperature):
            decided = [t > 0 for t in inv_temperature]
            sampling = (torch.tensor(inv_temperature + pad, dtype=torch.float32, device=self.device),
                        torch.tensor([u or 0.0 for u in uniform] + pad, dtype=torch.float32, device=self.device))
        keys = _key_length(max(lengths), self.cfg.max_seq_len)
        if sampling is None:
            logits, chosen = self._run_compiled("greedy", tokens, positions, keys, 1)
            chosen = chosen[:, 0]
        else:
            logits, chosen = self._run_compiled("sampled", tokens, positions, keys, *sampling)
        self.cache.advance(1)
        return logits[:n], chosen[:n], decided

    def _padded_rows(self) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        """A compiled graph's inputs: each running row's pending token and its position (B, 1),
        padded up to the batch size bucket with free rows (token 0 written at position 0 of a
        free row: a row is prefilled from scratch when a request takes it); and the running
        rows' lengths and the padding."""
        n = len(self.rows)
        pad = [0] * (self._bucket(n) - n)
        lengths = self.cache.host_lengths[:n]
        tokens = torch.tensor([s.pending for s in self.rows] + pad, device=self.device)[:, None]
        positions = torch.tensor(lengths + pad, device=self.device)[:, None]
        return tokens, positions, lengths, pad

    def _greedy_run_fits(self) -> bool:
        """Whether the next `greedy_run` tokens of every row can come from one compiled call: all
        rows greedy, none with a calculator result to write or wanting logprobs, and room in the
        context for the whole run (the positions it writes stay inside the cache and the
        position table)."""
        n = len(self.rows)
        return (self.greedy_run > 1 and n <= self.compile_max_batch
                and max(self.cache.host_lengths[:n]) + self.greedy_run <= self.cfg.max_seq_len
                and all(s.request.params.temperature == 0 and not s.forced and not s.request.params.logprobs
                        for s in self.rows))

    def _decode_greedy_run(self) -> None:
        """`greedy_run` greedy steps of every row in one compiled call (`_decode_greedy`). Each
        row takes its tokens in order until one ends it (a stop token or string, max_tokens, the
        context) or starts a calculator result, exactly as single steps would; its cache length
        counts the tokens it took, so what the run wrote past them is overwritten later."""
        n = len(self.rows)
        self.cache.use_rows(0, n)
        tokens, positions, lengths, _ = self._padded_rows()
        keys = _key_length(max(lengths) + self.greedy_run - 1, self.cfg.max_seq_len)
        _, chosen = self._run_compiled("run", tokens, positions, keys, self.greedy_run)
        for row, (seq, length, run) in enumerate(zip(self.rows, lengths, chosen[:n].tolist(), strict=True)):
            taken = 0
            for token in run:
                self._advance(seq, token, None)
                taken += 1
                if seq.finished or seq.forced:
                    break
            self.cache.set_length(row, length + taken)

    def _buffer(self, name: str, like: torch.Tensor, width: int | None = None) -> torch.Tensor | None:
        """A float32 (rows of `like`, `width` or the model's vocabulary) tensor that every eager
        step reuses for its logits or its sampler's work, on CPU where nothing else keeps them:
        at 64 rows each is 1 MB that malloc gave back to the kernel and faulted in again page by
        page, ~480 page faults a step, ~10% of an eager rollout (benchmarks/RESULTS.md). None
        where a fresh tensor is what works (other devices, other dtypes, autocast)."""
        if (self.device.type != "cpu" or like.dtype != torch.float32 or like.dim() != 2
                or torch.is_autocast_enabled("cpu")):
            return None
        width = width or self.cfg.vocab_size
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape[0] < like.shape[0] or buffer.shape[1] != width:
            buffer = self._buffers[name] = torch.empty(max(like.shape[0], self.max_batch), width)
        return buffer[:like.shape[0]]

    def _bucket(self, n: int) -> int:
        return min(1 << (n - 1).bit_length(), self.compile_max_batch)

    def _run_compiled(self, kind: str, tokens: torch.Tensor, positions: torch.Tensor, keys: int,
                      *extra) -> tuple[torch.Tensor, torch.Tensor]:
        """Call the `kind` graph ("greedy", "run" or "sampled") on rows 0..len(tokens) of the
        cache over `keys` keys; `extra`: the greedy graphs' step count, the sampled one's
        inverse temperatures and uniform numbers."""
        start = time.perf_counter()
        key_index = torch.arange(keys, device=self.device)
        # The key length is the graph's one dynamic size (see _DecodeView): one graph per bucket.
        torch._dynamo.maybe_mark_dynamic(key_index, 0)
        step = self._compiled[kind]
        args = (self.model, self.cache.k, self.cache.v, tokens, positions, key_index, self.tokenizer.vocab_size,
                *extra)
        if self.in_eager_region:  # compiled all the same (see __init__); the switch costs ~0.1 ms
            with torch.compiler.set_stance("default"):
                out = step(*args)
        else:
            out = step(*args)
        key = (tokens.shape[0], kind)
        if key not in self._compiled_buckets:  # this call compiled it
            self._compiled_buckets.add(key)
            self.compile_seconds += time.perf_counter() - start
        return out

    @torch.inference_mode()
    def warm_up(self, sampled: bool = True) -> float:
        """Compile the decode step for every batch size bucket now rather than at the first step
        that needs it, the graphs for greedy steps and runs and, with `sampled`, the one for steps
        with sampled rows; returns the seconds it took (0 without `compile`). Call it while the
        engine is idle: it writes into free rows. torch.compile keeps its results on disk, so a
        later process with the same model shape compiles much faster."""
        before = self.compile_seconds
        for bucket in sorted({self._bucket(n) for n in range(1, self.compile_max_batch + 1)}):
            # Distinct tensors, never one twice: dynamo guards on aliasing, and the steps never alias.
            tokens, positions = (torch.zeros(bucket, 1, dtype=torch.long, device=self.device) for _ in "tp")
            self._run_compiled("greedy", tokens, positions, _key_length(0, self.cfg.max_seq_len), 1)
            if self.greedy_run > 1:
                self._run_compiled("run", tokens, positions, _key_length(self.greedy_run - 1, self.cfg.max_seq_len),
                                   self.greedy_run)
            if sampled:
                sampling = tuple(torch.ones(bucket, dtype=torch.float32, device=self.device) / 2 for _ in "iu")
                self._run_compiled("sampled", tokens, positions, _key_length(0, self.cfg.max_seq_len), *sampling)
        return self.compile_seconds - before

    def _admit(self) -> None:
        """Prefill the waiting requests that fit, shortest first, in one packed forward
        (`_PackedPrefill`), and fan out."""
        admitted: list[Request] = []
        free = self.max_batch - len(self.rows)
        with self._wake:
            while self._waiting and (self._waiting[0].cancelled or self._waiting[0].params.n <= free):
                request = self._waiting.popleft()
                if not request.cancelled:
                    admitted.append(request)
                    free -= request.params.n
        if not admitted:
            return
        admitted.sort(key=lambda r: len(r.prompt_ids))
        lo = len(self.rows)
        logits = self._prefill(admitted, lo)
        first = [_Sequence(r, 0) for r in admitted]
        self.rows += first
        copies: list[tuple[_Sequence, int]] = []  # (sample, index of its prompt's logits)
        for i, r in enumerate(admitted):
            for index in range(1, r.params.n):
                self.cache.copy_row(lo + i, len(self.rows))
                self.rows.append(_Sequence(r, index))
                copies.append((self.rows[-1], i))
        self._sample(first + [s for s, _ in copies], torch.cat([logits, logits[[i for _, i in copies]]]))

    def _prefill(self, requests: list[Request], lo: int) -> torch.Tensor:
        """One packed forward of `requests`' prompts into cache rows lo.. on (`_PackedPrefill`):
        the logits (len(requests), vocab) after each prompt's last token."""
        lengths = [len(r.prompt_ids) for r in requests]
        idx = torch.tensor([[t for r in requests for t in r.prompt_ids]], device=self.device)
        packed = _PackedPrefill(self.cache, lo, lengths)
        # The last block's output projection and MLP at each prompt's last token only: nothing
        # else of the last layer is read (its keys and values are made for every token).
        last = torch.tensor([b - 1 for _, b in packed.bounds], device=self.device)
        h = self.model.hidden_states(idx, packed, rows=last)
        for row, length in zip(range(lo, lo + len(requests)), lengths, strict=True):
            self.cache.set_length(row, length)
        return self.model.head(self.model.norm(h))

    def _drop_finished(self) -> None:
        """Remove finished and cancelled rows; the last row moves into each hole."""
        i = 0
        while i < len(self.rows):
            if self.rows[i].finished or self.rows[i].request.cancelled:
                last = len(self.rows) - 1
                if i != last:
                    self.cache.copy_row(last, i)
                    self.rows[i] = self.rows[last]
                self.rows.pop()
            else:
                i += 1

    # ---- sampling and text

    @staticmethod
    def _uniform(seqs: list[_Sequence]) -> list[float | None]:
        """Each row's uniform number for its next token from its own generator, or None for a
        row that does not sample (greedy, or a calculator result to write)."""
        return [s.rng.random() if not s.forced and s.request.params.temperature > 0 else None for s in seqs]

    def _sample(self, seqs: list[_Sequence], logits: torch.Tensor, chosen: torch.Tensor | None = None,
                decided: Sequence[bool] = (), uniform: list[float | None] | None = None) -> None:
        """Pick every row's next token with its own request's rules in one batched draw, then hand
        out the text. `chosen`: the compiled step's tokens for the rows `decided` says (see
        `_decode`). The other rows: greedy ones by one argmax, sampled ones by `sample_rows`, each
        at its number in `uniform` (`_uniform`: drawn here when not given). One host transfer of
        the tokens per step."""
        logits = logits[:, :self.tokenizer.vocab_size].float()
        if uniform is None:
            uniform = self._uniform(seqs)
        n = len(seqs)
        todo = range(n) if chosen is None else [i for i in range(n) if not decided[i]]
        greedy = [i for i in todo if uniform[i] is None]
        drawn = [i for i in todo if uniform[i] is not None]
        tokens = torch.zeros(n, dtype=torch.long, device=logits.device) if chosen is None else chosen
        if greedy:
            tokens[greedy] = (logits if len(greedy) == n else logits[greedy]).argmax(dim=-1)
        if drawn:
            params = [seqs[i].request.params for i in drawn]
            rows = logits if len(drawn) == n else logits[drawn]
            scratch = self._buffer("scaled", rows, rows.shape[1]), self._buffer("weights", rows, rows.shape[1])
            tokens[drawn] = sample_rows(rows, [p.temperature for p in params], [p.filter_values[0] for p in params],
                                        [p.filter_values[1] for p in params], [uniform[i] for i in drawn],
                                        None if scratch[0] is None else scratch)
        wanted = [i for i, s in enumerate(seqs) if s.request.params.logprobs and not s.forced]
        logprobs = self._logprobs(logits[wanted], tokens[wanted], [seqs[i].request.params.top_logprobs
                                                                    for i in wanted]) if wanted else []
        chosen_ids = tokens.tolist()
        if -1 in chosen_ids:  # NaN/inf logits from finite weights: e.g. an fp16/bf16 overflow
            raise UserError(NON_FINITE)
        found = dict(zip(wanted, logprobs, strict=True))
        for i, seq in enumerate(seqs):
            if seq.forced:  # a calculator result: written for the model, not sampled
                self._advance(seq, seq.forced.pop(0), None, forced=True)
            else:
                self._advance(seq, chosen_ids[i], found.get(i))

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: torch.Tensor, tops: list[int]) -> list[TokenLogprob]:
        """Each row's chosen token's log-probability (temperature 1) and its `tops[i]` best,
        batched: one log-softmax, one gather, one top-k for all the rows."""
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
        width = max(tops)
        best = torch.topk(log_probs, width) if width else None
        values = best.values.tolist() if best is not None else []
        indices = best.indices.tolist() if best is not None else []
        return [TokenLogprob(int(t), lp, list(zip(indices[i][:k], values[i][:k], strict=True)) if k else [])
                for i, (t, lp, k) in enumerate(zip(tokens.tolist(), chosen, tops, strict=True))]

    def _calculator(self, seq: _Sequence, token: int) -> None:
        """`<|tool|>expression<|/tool|>` in a sequence: its value (or "error") becomes the next
        tokens, forced (lmforge.calculator evaluates arithmetic only)."""
        from lmforge.calculator import CalculatorError, calculate

        open_id, close_id = self.tool_ids
        if token == open_id:
            seq.tool_start = len(seq.token_ids)
        elif token == close_id and seq.tool_start is not None:
            expression = self.tokenizer.decode_bytes(seq.token_ids[seq.tool_start:-1])
            try:
                result = calculate(expression.decode("utf-8", errors="replace"))
            except CalculatorError:
                result = "error"
            seq.forced, seq.tool_start = self.tokenizer.encode(result), None

    def _advance(self, seq: _Sequence, token: int, logprob: TokenLogprob | None, forced: bool = False) -> None:
        """Add a token to a sequence and send its request the text that is now certain."""
        p = seq.request.params
        reason = None
        new_ids, new_logprobs = [], []
        if token in self.stop_ids:
            reason = "stop"
        else:
            seq.token_ids.append(token)
            new_ids, new_logprobs = [token], [logprob] if logprob is not None else []
            full = (len(seq.token_ids) >= p.max_tokens
                    or len(seq.request.prompt_ids) + len(seq.token_ids) >= self.cfg.max_seq_len)
            reason = "length" if full else None
            if self.tool_ids is not None:
                self._calculator(seq, token)
        seq.pending = token
        if seq.request.stream or p.stop:  # the text token by token
            text, reason = self._text(seq, new_ids, reason)
        else:  # nobody reads it before the end: the row's decoder takes every token once then
            text = seq.decoder.decode(self.tokenizer.decode_bytes(seq.token_ids), final=True) if reason else ""
        seq.finished = reason is not None
        if seq.request.stream:
            if text or new_ids or reason:
                seq.request._put(Event(seq.index, text, new_ids, new_logprobs, reason, forced))
            return
        # One event per run of sampled or of forced tokens (rollouts mask the forced ones).
        if seq.chunk is not None and seq.chunk.forced != forced:
            seq.request._put(seq.chunk)
            seq.chunk = None
        if seq.chunk is None:
            seq.chunk = Event(seq.index, "", [], [], None, forced)
        seq.chunk.text += text
        seq.chunk.token_ids += new_ids
        seq.chunk.logprobs += new_logprobs
        if reason is not None:
            seq.chunk.finish_reason = reason
            seq.request._put(seq.chunk)
            seq.chunk = None

    def _text(self, seq: _Sequence, new_ids: list[int], reason: str | None) -> tuple[str, str | None]:
        """Decode a sequence's new token and return the text now certain (whole characters, never
        part of a stop string) and the finish reason, "stop" where a stop string ends the text."""
        p = seq.request.params
        seq.text += seq.decoder.decode(self.tokenizer.decode_bytes(new_ids), final=reason is not None)
        # A stop string ends the text where it starts (it may span tokens: search the whole
        # unsent text, which never holds the start of one, see below).
        hits = [i for i in (seq.text.find(stop, seq.emitted) for stop in p.stop if stop) if i >= 0] if p.stop else []
        if hits:
            seq.text, reason = seq.text[:min(hits)], "stop"
        end = len(seq.text)
        if reason is None and p.stop:  # hold back a tail that may be the start of a stop string
            end -= max((k for stop in p.stop for k in range(1, len(stop))
                        if seq.text.endswith(stop[:k])), default=0)
        text = seq.text[seq.emitted:end]
        seq.emitted = end
        return text, reason


def load_engine(checkpoint: str, device: str = "cpu", max_batch: int = 16,
                compile: bool = False) -> tuple[Engine, str]:
    """An engine over a checkpoint and its tokenizer, and the model's name (its directory's);
    `compile`: see `Engine`."""
    from lmforge.checkpoint import load_model, resolve_checkpoint
    from lmforge.errors import UserError
    from lmforge.tokenizer import load_tokenizer

    directory = resolve_checkpoint(checkpoint)
    if not (directory / "tokenizer").is_dir():
        raise UserError(f"{directory} has no tokenizer/ directory; generation needs the model's tokenizer")
    model = load_model(directory, device=device)
    return Engine(model, load_tokenizer(directory / "tokenizer"), max_batch, compile), directory.name

__all__ = ["STOP_TOKENS", "TOOL_TOKENS", "Completion", "Engine", "Event", "Generation", "KVCache",
           "RaggedKVCache", "Request", "SamplingParams", "TokenLogprob", "check_sampling", "generate",
           "generate_text", "load_engine", "prompt_ids",
           "sample_next", "sample_rows", "stream"]
