"""Network operations with hand-written backward passes, for what they keep for backward.

Plain autograd keeps every intermediate an op's backward reads. Where one of those is cheap to
compute again from tensors kept anyway, keeping it costs a large tensor per layer for no speed:
these functions keep less, and their gradients equal plain autograd's (tests/test_autograd_ops.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up.

    Autograd on `F.silu(gate) * up` also keeps silu(gate), a (tokens, ffn) tensor per layer - the
    widest activations of the block, one of four. Backward makes it again from gate, one pass of
    the pass silu's own backward makes anyway (it recomputes the sigmoid too)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        grad_up = F.silu(gate).mul_(grad)
        grad_silu = grad * up
        # d silu(g) / dg, times grad_silu, written over grad_silu (elementwise: aliasing is safe).
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=grad_silu)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated activation of the Llama MLP; backward keeps gate and up only."""
    return _SwiGLU.apply(gate, up)
