"""Generation: the KV cache, the sampling rule and the decode loop, for every caller.

    prompt ids -> prefill (one pass, fills the KVCache) -> sample_next -> one-token step -> ...

`generate` (a batch of prompts, tensor in and out), `stream` (one prompt, ids one at a time) and
`generate_text` (text in, text out, with a tokenizer) all run the same `_decode` loop, so the
trainer's periodic samples, `lmforge sample` and the pipeline's sample stage agree on the rules.
The model (lmforge/model.py) is the network alone: its forward accepts a cache object, nothing more.

Rules of `generate_text`:

- a prompt of "" (or one that encodes to nothing) starts a new document: the prompt is <|endoftext|>;
- generation stops at <|endoftext|> (not included in the text);
- ids the tokenizer does not have (model.vocab_size may be padded past tokenizer.vocab_size) are
  never sampled (`vocab_limit`);
- text is decoded incrementally from the byte stream, so a token that splits a UTF-8 character
  never produces a broken character in the middle of the text;
- a prompt longer than the model's context and non-finite sampling values are refused (UserError)
  before anything is generated; `Generation.stopped` says why generation ended, so a caller can
  tell the user when the context, not the model, ended the text.
"""

from __future__ import annotations

import codecs
import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import UserError
from lmforge.model import compute_dtype

# --------------------------------------------------------------------------------------------
# The key/value cache for incremental decoding


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    `pos` counts the positions filled so far. Writes go into slices in place; attention reads a
    view of the filled prefix, so decoding one token allocates no cache memory.
    """

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
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


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


def _compiled_step(model: nn.Module) -> Callable:
    """The model's forward compiled for one-token steps. The first step specialises on the cache
    position, the second recompiles with the position as a dynamic size; from then on one graph
    serves every step and every prompt (the cache always spans model.max_seq_len, so its shape
    never changes). On CPU the C++ wrapper removes most per-kernel Python cost."""
    if model not in _COMPILED_STEPS:
        options = {"cpp_wrapper": True} if next(model.parameters()).device.type == "cpu" else {}
        _COMPILED_STEPS[model] = torch.compile(model.forward, options=options)
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
    """Continue `prompt` by up to `max_new_tokens` tokens with `model` (a `Transformer`).

    temperature 0 is greedy; top_k None/0 and top_p None/1 disable those filters. The sampling
    generator lives on the model's device, seeded with `seed`. `on_text` receives each decoded
    piece as it is produced (for streaming to a terminal). `compile` runs the one-token decode
    step through torch.compile (see `generate`): for long generations from small models.
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
        for token in stream(model, ids, max_new_tokens, temperature=temperature,
                            top_k=top_k or None, top_p=top_p, stop_tokens=[tokenizer.eot_id],
                            generator=generator, vocab_limit=tokenizer.vocab_size, compile=compile):
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


__all__ = ["Generation", "KVCache", "check_sampling", "generate", "generate_text", "prompt_ids",
           "sample_next", "stream"]
