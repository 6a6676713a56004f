"""The decoder-only transformer, one file, top to bottom.

    tokens -> embed_tokens -> N x Block -> norm -> lm_head -> logits

    Block (arch "llama"):  h = h + self_attn(input_layernorm(h))        RMSNorm, RoPE, GQA, SwiGLU
                           h = h + mlp(post_attention_layernorm(h))
    Block (arch "gpt2"):   the same wiring with LayerNorm (with bias), learned absolute positions
                           (`embed_positions`), biased projections and a GELU MLP: a baseline.

Parameter names are Hugging Face Llama's without the "model." prefix (`embed_tokens.weight`,
`layers.0.self_attn.q_proj.weight`, ..., `norm.weight`, `lm_head.weight`), and the math is the same
(RoPE in the "rotate half" layout, Qwen3-style QK-norm), so weights convert by renaming only.
With tied embeddings there is no `lm_head` at all: the head multiplies by `embed_tokens.weight`.

`layers` is a ModuleDict keyed "0".."n-1" and `embed_tokens`, `norm` and `lm_head` may be set to
None: a pipeline stage deletes what it does not own, keeps stable parameter names, and its forward
maps hidden states to hidden states.

Generation (the KV cache, sampling, the decode loop) lives in lmforge/engine.py: `forward` takes an
optional cache object (`pos`, `update(layer, k, v)`, `advance(T)`, and for a ragged batch
`positions(T)` and `attention_mask(T)`, optionally `attend(q, k, v, mask)` in place of SDPA), and
that is all the network knows of it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from lmforge.autograd_ops import normed_then, rms_norm, swiglu_down
from lmforge.config import ModelConfig

if TYPE_CHECKING:  # the cache is the engine's; the network only calls its update()
    from lmforge.engine import KVCache


def compute_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype matrix products run in on this device type: autocast's when autocast is on
    there, else `default` (the weights' or activations' own dtype)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


# --------------------------------------------------------------------------------------------
# Normalisation and rotary position embeddings


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed by PyTorch's fused kernel (backward: lmforge/autograd_ops.py)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    if cfg.arch == "gpt2":
        return nn.LayerNorm(dim, eps=cfg.norm_eps)
    return RMSNorm(dim, cfg.norm_eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of position * frequency, each (max_seq_len, head_dim).

    Frequency i (of head_dim / 2) is theta^(-2i / head_dim), laid out twice ([f0..f_{d/2-1},
    f0..f_{d/2-1}]) for the "rotate half" pairing of dimension j with j + head_dim / 2, as in
    Hugging Face Llama, so its checkpoints load without permutation. The sin table's first half
    is negated, which lets `apply_rope` rotate with one `roll` instead of split, negate and concat.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos(), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_j, x_{j+d/2}) of x (B, heads, T, d) by its angle (tables (T, d)):

        (x_j, x_{j+d/2}) -> (x_j cos - x_{j+d/2} sin,  x_{j+d/2} cos + x_j sin)

    `roll` by d/2 swaps the halves; the signed sin table supplies the minus sign.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# --------------------------------------------------------------------------------------------
# The blocks


def _at_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, ...) at `rows`, indices into the flattened B * T positions: (N, ...); all of x
    without them."""
    return x if rows is None else x.flatten(0, 1).index_select(0, rows)


class Attention(nn.Module):
    """Causal self-attention with grouped key/value heads (MHA, GQA or MQA by `n_kv_heads`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        bias = cfg.arch == "gpt2"
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=bias)
        # Qwen3-style QK-norm: an RMSNorm over each head's query and key, before RoPE.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None, layer: int, mask: torch.Tensor | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); with `rows` (indices into the flattened B * T
        positions) the output projection runs at those rows only: (N, d_model)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, d)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        # Causal with no cache or an empty one; a single new query sees every cached key (no
        # mask); a chunk appended to a filled cache needs the explicit `mask`. Without a cache
        # the length is not read: in a block compiled for any length (SFT's rows) it is a
        # symbolic size, and a comparison of it is no bool for SDPA (a graph break).
        is_causal = mask is None and (cache is None or q.shape[2] > 1)
        attend = getattr(cache, "attend", None)  # a cache may bring its own kernel (the engine's decode)
        if attend is not None:
            y = attend(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(_at_rows(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim), rows))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the Llama MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu_down(self.down_proj, self.gate_proj(x), self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))) with biases: the GPT-2 MLP."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_dim)
        self.down_proj = nn.Linear(cfg.ffn_dim, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


class Block(nn.Module):
    """Pre-norm residual block: attention, then MLP, each added back to the residual stream."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer  # index into the KV cache; stays right when a pipeline drops layers
        self.input_layernorm = make_norm(cfg, cfg.d_model)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg, cfg.d_model)
        self.mlp = GeluMLP(cfg) if cfg.arch == "gpt2" else SwiGLU(cfg)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                cache: KVCache | None = None, mask: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, d_model) -> (B, T, d_model); with `rows` (indices into the flattened B * T
        positions), the output at those rows only, (N, d_model): every position's keys and values
        are still made, but past the attention nothing of another row is read."""
        # The layer index only matters to a cache; without one it is not read, so a compiled
        # block's code is not specialised per layer (one compilation serves every block).
        layer = self.layer if cache is not None else -1
        # h + attention(norm(h)): the normed input is made again in backward, not kept.
        attended = normed_then(self.input_layernorm, h, lambda x: self.self_attn(x, rope, cache, layer, mask, rows))
        h = _at_rows(h, rows) + attended
        return h + normed_then(self.post_attention_layernorm, h, self.mlp)


def _compiled(module: nn.Module) -> bool:
    """Whether `module.compile()` was called (torch keeps the compiled call on the module)."""
    return getattr(module, "_compiled_call_impl", None) is not None


# --------------------------------------------------------------------------------------------
# The fused LM head + cross-entropy used in training


class FusedHeadLoss(torch.autograd.Function):
    """Mean cross-entropy of `h @ weight.T` against `targets`, computed a chunk of rows at a time,
    with the gradients worked out in the forward pass.

    The plain path writes the (tokens, vocab) logits, their log-softmax and, in the backward pass,
    a gradient of the same size: several passes over a tensor far larger than the model's
    activations. Here each chunk's logits stay small enough to sit in cache; they are turned in
    place into the gradient of the loss, softmax(logits) - onehot(target), and multiplied straight
    into the gradients of `h` and `weight`. Backward then only scales those by the incoming
    gradient. The same three matrix products as the plain path, no (tokens, vocab) tensor alive.
    Targets equal to `ignore_index` count neither in the loss nor in the mean.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int) -> torch.Tensor:
        # Under autocast the products run in the autocast dtype, as nn.Linear's would; the softmax
        # and the gradient accumulation run in fp32.
        device_type = h.device.type
        dtype = compute_dtype(device_type, h.dtype)
        with torch.autocast(device_type, enabled=False):
            valid = targets != ignore_index
            scale = 1.0 / valid.sum().clamp(min=1).float()  # the mean over counted tokens
            safe_targets = torch.where(valid, targets, 0)[:, None]
            w = weight.to(dtype)
            want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            # One logits buffer for every chunk: reused memory stays in cache (and is not
            # fresh pages to fault in), which is the point of chunking on CPU.
            buffer = torch.empty(min(chunk_rows, h.shape[0]), weight.shape[0], dtype=dtype, device=h.device)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                h_chunk = h[rows].to(dtype)
                logits = torch.mm(h_chunk, w.t(), out=buffer[: h_chunk.shape[0]]).float()
                target = safe_targets[rows]
                weight_rows = valid[rows, None] * scale  # 1/n for counted rows, 0 for ignored ones
                target_logit = logits.gather(1, target)
                row_max = logits.amax(dim=1, keepdim=True)
                sum_exp = logits.sub_(row_max).exp_().sum(dim=1, keepdim=True)  # logits := exp(l - max)
                total += ((sum_exp.log() + row_max - target_logit) * weight_rows).sum()
                # d loss / d logits = (softmax - onehot(target)) / n, built in the logits' memory.
                grad_logits = logits.mul_(weight_rows / sum_exp).scatter_add_(1, target, -weight_rows)
                grad_logits = grad_logits.to(dtype)
                # Products written straight into the gradients where the dtypes allow: no
                # temporary per chunk and no extra pass to add it.
                if want_h and grad_h.dtype == dtype:
                    torch.mm(grad_logits, w, out=grad_h[rows])
                elif want_h:
                    grad_h[rows] = grad_logits @ w
                if want_w and dtype == torch.float32:
                    grad_w.addmm_(grad_logits.t(), h_chunk)
                elif want_w:
                    grad_w += grad_logits.t() @ h_chunk
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if want_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        return (grad_h * grad_loss if grad_h is not None else None,
                grad_w * grad_loss if grad_w is not None else None, None, None, None)


def loss_positions(targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Indices into the flattened `targets` of those that count (not `ignore_index`): the
    `positions` for `Transformer.loss`. Compute them where the targets are made (on the host),
    and moving them to the device costs no synchronisation."""
    return (targets.reshape(-1) != ignore_index).nonzero().squeeze(1)


def fused_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    ignore_index: int = -100) -> torch.Tensor:
    """Mean cross-entropy of the logits `h @ weight.T` ((N, d) @ (d, V)) against `targets` (N,),
    equal to `F.cross_entropy(F.linear(h, weight), targets)` without materialising the logits.

    Chunks of about 2^21 logits (8 MiB in fp32, 512 tokens at a 4k vocabulary) on CPU, small
    enough to stay in cache; in a tiny-preset step on 2 threads they measured 4-7% faster than
    2^19 (fewer, larger products per thread), the same on 1 thread. About 2^26 on GPUs, where
    fewer, larger products matter more."""
    budget = 1 << (21 if h.device.type == "cpu" else 26)
    chunk_rows = max(1, budget // weight.shape[0])
    return FusedHeadLoss.apply(h, weight, targets, ignore_index, chunk_rows)


# --------------------------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    """The whole model: `model(idx)` -> logits, `model.loss(...)`; generation is lmforge.engine."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.embed_positions: nn.Embedding | None = (
            nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.arch == "gpt2" else None
        )
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in range(cfg.n_layers)})
        self.norm: nn.Module | None = make_norm(cfg, cfg.d_model)
        self.lm_head: nn.Linear | None = (
            None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        )
        # RoPE tables are derived, not learned: non-persistent buffers, absent from checkpoints.
        self.rope_cos: torch.Tensor | None
        self.rope_sin: torch.Tensor | None
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.init_weights()

    # ---- initialisation

    @torch.no_grad()
    def init_weights(self, buffer_device: torch.device | str | None = None) -> None:
        """Normal(0, init_std) weights, unit norms, zero biases; residual outputs scaled down.

        The two projections that write into the residual stream (o_proj, down_proj) get
        std / sqrt(2 * n_layers), so the stream's variance does not grow with depth (GPT-2).
        Also (re)builds the RoPE tables, e.g. after the model was created on the meta device.
        """
        cfg = self.cfg
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers) if cfg.scale_residual_init else cfg.init_std
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else cfg.init_std
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()  # weight 1, bias 0
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        self.init_buffers(buffer_device)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)build the derived RoPE tables, e.g. after creating the model on the meta device."""
        if self.cfg.arch == "llama":
            device = device or self._param().device
            self.rope_cos, self.rope_sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len,
                                                       self.cfg.rope_theta, device)

    # ---- forward

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None, last_only: bool = False,
                targets: torch.Tensor | None = None, ignore_index: int = -100,
                reduction: str = "mean", head_loss: Callable[..., torch.Tensor] | None = None,
                checkpoint_blocks: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> logits (B, T, vocab); (B, 1, vocab) when `last_only`; the loss of
        `targets` (see `loss`) when they are given, computed by `head_loss` (a callable with the
        signature of the method `head_loss`, e.g. a compiled or fused one the trainer holds),
        only at `positions` when they are given (see `loss`).

        With a `cache`, the T tokens continue the cached sequence at position `cache.pos`.
        `checkpoint_blocks` recomputes each block's activations in backward instead of storing them.
        A pipeline stage without `embed_tokens` takes hidden states (B, T, d_model) instead, and
        one without `norm` returns hidden states.
        """
        # The head only where the loss counts (see `loss`), and the last block's output too.
        rows = positions if targets is not None and self.norm is not None else None
        h = self.hidden_states(idx, cache, checkpoint_blocks, rows)
        if self.norm is None:
            return h
        if targets is not None:
            if positions is not None:
                targets = targets.flatten().index_select(0, positions)
            return (head_loss or self.head_loss)(h, targets, ignore_index, reduction)
        if last_only:
            h = h[:, -1:]
        return self.head(self.norm(h))

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None,
                      checkpoint_blocks: bool = False, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Embedding and blocks: token ids (B, T) -> the residual stream after the last block;
        with `rows` (indices into the flattened B * T positions) at those rows only, (N, d_model):
        the last block then runs its output projection and MLP there alone (what the head reads
        for SFT's loss, about half the tokens), the same values as selecting them afterwards."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        h = self.embed_tokens(idx) if self.embed_tokens is not None else idx
        # A ragged cache (the engine's batches: every row at its own position) gives (B, T)
        # positions and a (B, 1, T, keys) mask; a plain cache one start for the whole batch.
        positions = cache.positions(T) if cache is not None and cache.ragged else None
        if self.embed_positions is not None:
            h = h + (self.embed_positions(positions) if positions is not None
                     else self.embed_positions.weight[start:start + T])
        rope = None
        if self.rope_cos is not None and positions is not None:  # (B, 1, T, d): per row
            rope = (self.rope_cos[positions].unsqueeze(1).to(h.dtype),
                    self.rope_sin[positions].unsqueeze(1).to(h.dtype))
        elif self.rope_cos is not None:  # tables kept in fp32, used in the activations' dtype
            rope = (self.rope_cos[start:start + T].to(h.dtype), self.rope_sin[start:start + T].to(h.dtype))
        mask = None
        if positions is not None:
            mask = cache.attention_mask(T)
        elif start > 0 and T > 1:  # a chunk after cached tokens: query i sees keys 0..start+i
            mask = torch.ones(T, start + T, dtype=torch.bool, device=h.device).tril(diagonal=start)
        blocks = list(self.layers.values())
        # A compiled block is not given the rows: its variant with them would double the graphs
        # compiled (and, with evaluation's no-grad ones, reach dynamo's recompile limit of 8).
        rows_in_block = rows is not None and bool(blocks) and not _compiled(blocks[-1])
        for i, block in enumerate(blocks):
            block_rows = rows if rows_in_block and i == len(blocks) - 1 else None
            if checkpoint_blocks:  # the block's hooks (FSDP, compile) run again in the recompute
                h = checkpoint(block, h, rope, cache, mask, block_rows, use_reentrant=False)
            else:
                h = block(h, rope, cache, mask, block_rows)
        if cache is not None:
            cache.advance(T)
        return h if rows_in_block else _at_rows(h, rows)

    def head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states -> logits; with tied embeddings the head is embed_tokens.weight.
        `out`: a (N, vocab) tensor for the logits of h (N, d_model) (the CPU engine reuses one),
        or None."""
        if out is not None and (self.lm_head is None or self.lm_head.bias is None):
            return torch.mm(h, self.head_weight().t(), out=out)
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.head_weight())

    def head_weight(self) -> torch.Tensor:
        """The (vocab, d_model) matrix of the LM head: lm_head's, or the tied embedding's."""
        if self.lm_head is not None:
            return self.lm_head.weight
        if self.embed_tokens is None:
            raise RuntimeError("tied embeddings: the stage computing logits needs embed_tokens")
        return self.embed_tokens.weight

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
             reduction: str = "mean", head_loss: Callable[..., torch.Tensor] | None = None,
             checkpoint_blocks: bool = False, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy of `targets` (B, T); "none" returns per-token losses (B, T).
        `head_loss` and `checkpoint_blocks` as in `forward`.

        `positions` (N,), indices into the flattened (B * T) positions, computes the last block's
        output projection and MLP, the final norm, the LM head and the loss at those positions
        only: the mean is then over their targets and "none" returns (N,) losses. With every
        position whose target is not `ignore_index` (`loss_positions(targets)`) the mean loss and
        its gradients are those of the whole batch, at the cost of the counted tokens alone for
        that part (SFT counts only the assistant's).

        It runs through `forward` (the module call), so wrappers' hooks see it: FSDP gathers the
        root's weights there, and a compiled or hooked forward applies to training too."""
        return self(idx, targets=targets, ignore_index=ignore_index, reduction=reduction,
                    head_loss=head_loss, checkpoint_blocks=checkpoint_blocks, positions=positions)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", fused: bool = False) -> torch.Tensor:
        """Final norm, LM head and cross-entropy of the last hidden states. A method of its own
        so it can be compiled apart from the blocks: as one graph the (B, T, vocab) logits and
        their softmax fuse, worth ~15% of a CPU training step with a 4k vocabulary. With
        `fused`, a mean loss that needs gradients goes through `fused_head_loss`."""
        h = self.norm(h)
        if fused and reduction == "mean" and torch.is_grad_enabled():
            return fused_head_loss(h.reshape(-1, h.shape[-1]), self.head_weight(), targets.reshape(-1), ignore_index)
        logits = self.head(h)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=ignore_index, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

