"""Per-token log-probabilities of chosen tokens without a (tokens, vocab) tensor kept alive.

Preference losses need each answer's summed log-probability with gradients, not a mean
cross-entropy, so the fused loss of pre-training and SFT (whose gradient is fixed in its forward
pass) does not apply. The plain path keeps the logits, their log-softmax and their gradient, three
(tokens, vocab) tensors that dwarf a small model's activations. Here the forward pass computes the
logits a chunk of rows at a time and keeps only each row's log-sum-exp; the backward pass computes
each chunk's logits again and turns them into the gradient, softmax - onehot(target), scaled by
the incoming gradient of that row. One extra head product buys a memory footprint like SFT's.

    nll = token_nll(model, h, targets)      # (B, T) -log p(target), 0 where target == ignore_index

`model_token_nll(model)` is the same as a `head_loss` for `model.loss(..., reduction="none")`, so
the model runs through its module call (wrappers' hooks see it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from lmforge.model import compute_dtype


class _TokenNLL(torch.autograd.Function):
    """-log softmax(h @ weight.T)[target] per row of h (N, d); 0 for ignored targets."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                ignore_index: int, chunk_rows: int) -> torch.Tensor:
        dtype = compute_dtype(h.device.type, h.dtype)  # autocast's products, fp32 softmax at least
        wide = torch.promote_types(dtype, torch.float32)
        with torch.autocast(h.device.type, enabled=False):
            valid = targets != ignore_index
            safe = torch.where(valid, targets, 0)
            w = weight.to(dtype)
            lse = torch.empty(h.shape[0], dtype=wide, device=h.device)
            target_logit = torch.empty_like(lse)
            for start in range(0, h.shape[0], chunk_rows):
                rows = slice(start, start + chunk_rows)
                logits = (h[rows].to(dtype) @ w.t()).to(wide)
                lse[rows] = torch.logsumexp(logits, dim=1)
                target_logit[rows] = logits.gather(1, safe[rows, None])[:, 0]
        ctx.save_for_backward(h, weight, safe, valid, lse)
        ctx.chunk_rows = chunk_rows
        return (lse - target_logit) * valid

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        h, weight, safe, valid, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = compute_dtype(h.device.type, h.dtype)
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            g = (grad_nll.to(lse.dtype) * valid)[:, None]
            grad_h = torch.empty_like(h) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if want_w else None
            for start in range(0, h.shape[0], ctx.chunk_rows):
                rows = slice(start, start + ctx.chunk_rows)
                h_chunk = h[rows].to(dtype)
                logits = (h_chunk @ w.t()).to(lse.dtype)
                # d nll / d logits = softmax - onehot(target), times the row's incoming gradient.
                grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(g[rows])
                grad_logits = grad_logits.scatter_add_(1, safe[rows, None], -g[rows]).to(dtype)
                if want_h:
                    grad_h[rows] = (grad_logits @ w).to(h.dtype)
                if want_w:
                    grad_w += (grad_logits.t() @ h_chunk).to(lse.dtype)
        return grad_h, grad_w.to(weight.dtype) if want_w else None, None, None, None


def token_nll(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              ignore_index: int = -100) -> torch.Tensor:
    """-log p(target) of the logits h @ weight.T: h (..., d), targets (...) -> (...), 0 where
    the target is ignore_index. Chunks of ~2^21 logits on CPU, ~2^26 on GPUs (as fused_head_loss)."""
    budget = 1 << (21 if h.device.type == "cpu" else 26)
    chunk_rows = max(1, budget // weight.shape[0])
    flat = _TokenNLL.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index, chunk_rows)
    return flat.view(targets.shape)


def model_token_nll(model: nn.Module) -> Callable[..., torch.Tensor]:
    """A `head_loss` for `model.loss(x, y, reduction="none", head_loss=...)`: the final norm,
    then `token_nll` against the LM head."""
    return functools.partial(_model_head_nll, model)


def _model_head_nll(model: nn.Module, h: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                    reduction: str = "none") -> torch.Tensor:
    if reduction != "none":
        raise ValueError("model_token_nll gives per-token values: call model.loss with reduction='none'")
    return token_nll(model.norm(h), model.head_weight(), targets, ignore_index)


__all__ = ["model_token_nll", "token_nll"]
