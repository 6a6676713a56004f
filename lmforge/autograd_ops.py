"""Network operations with hand-written backward passes, for what they keep for backward.

Plain autograd keeps every intermediate an op's backward reads. Where one of those is cheap to
compute again from tensors kept anyway, keeping it costs a large tensor per layer for no speed:
these functions keep less, and their gradients equal plain autograd's (tests/test_autograd_ops.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up, keeping only gate and up.

    Autograd on `F.silu(gate) * up` also keeps silu(gate), a (tokens, ffn) tensor per layer - the
    widest activations of the block, one of four. Backward makes it again from gate (one exp
    pass; silu's own backward makes another) unless `swiglu_down` has just made it."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = ctx.saved_tensors
        silu, ctx.silu = getattr(ctx, "silu", None), None  # swiglu_down's refill may have made it
        grad_up = (F.silu(gate) if silu is None else silu).mul_(grad)
        grad_silu = grad * up
        # d silu(g) / dg, times grad_silu, written over grad_silu (elementwise: aliasing is safe).
        grad_gate = torch.ops.aten.silu_backward.grad_input(grad_silu, gate, grad_input=grad_silu)
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the gated activation of the Llama MLP; backward keeps gate and up only."""
    return _SwiGLU.apply(gate, up)


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are on (activation checkpointing, offloading): they decide
    what is kept then, and a tensor they never keep needs no dropping."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def swiglu_down(down: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor,
                up: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up), the Llama MLP's output, without keeping silu(gate) * up for backward.

    `down` (a linear layer, plain or LoRA) keeps its input, the product, for its weight gradient,
    while `swiglu` keeps gate and up, from which the product is one pass away. So the product's
    memory is released once `down` has run, and filled again by a hook that runs just before
    down's backward (the idea of Megatron-LM's CheckpointWithoutOutput). Under torch.compile (which
    chooses what to recompute itself), without gradients, or when saved-tensor hooks (activation
    checkpointing) manage what is kept, it is the plain composition. Nothing but `down` may hold
    the product: a forward hook on `down` that keeps its input would see released memory."""
    product = swiglu(gate, up)
    if (not product.requires_grad or torch.compiler.is_compiling() or _saved_tensors_hooked()):
        return down(product)
    out = down(product)
    nbytes = product.untyped_storage().nbytes()
    product.untyped_storage().resize_(0)
    # Held for the hook until it runs, then let go: backward frees gate and up (and down the
    # product) as soon as their own nodes are done with them, not with the whole graph.
    pending = [gate, up, product]

    def refill(grad_outputs: tuple[torch.Tensor, ...]) -> None:
        if not pending:  # a second backward through a retained graph: already filled
            return
        gate, up, product = pending
        pending.clear()
        storage = product.untyped_storage()
        storage.resize_(nbytes)
        # A new tensor on the same memory: writing through `product` itself would bump the
        # version counter autograd checks when down's backward reads its saved input.
        target = torch.empty(0, dtype=product.dtype, device=product.device)
        target.set_(storage, product.storage_offset(), product.shape, product.stride())
        with torch.no_grad():
            silu = F.silu(gate)
            torch.mul(silu, up, out=target)
        # swiglu's backward, next but one, needs silu(gate) too: one exp pass instead of two.
        product.grad_fn.silu = silu

    out.grad_fn.register_prehook(refill)
    return out
