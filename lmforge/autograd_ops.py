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


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) * weight by PyTorch's fused kernel, keeping x and 1 / rms(x).

    `F.rms_norm` runs fused only without gradients; with them it is a chain of small ops whose
    autograd also keeps x / rms(x) when the weight trains. The backward here is the closed form:

        x^ = x rstd     grad_x = rstd (g w - x^ mean(g w x^))     grad_w = sum over rows of g x^
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight, rstd = ctx.saved_tensors
        x_hat = x * rstd
        grad_w = (grad * x_hat).flatten(0, -2).sum(0) if ctx.needs_input_grad[1] else None
        grad_wx = grad * weight
        mean = torch.linalg.vecdot(grad_wx, x_hat).unsqueeze(-1).div_(x.shape[-1])
        return grad_wx.sub_(x_hat.mul_(mean)).mul_(rstd), grad_w, None


# The kernel that returns 1/rms beside the output (recent torch); an older torch keeps its composite.
_FUSED_RMS_NORM = hasattr(torch.ops.aten, "_fused_rms_norm")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """RMSNorm over the last dimension, equal to `F.rms_norm` (the same fused kernel forward)."""
    if (_FUSED_RMS_NORM and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64)
            and torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _RMSNorm.apply(x, weight, eps)
    # No gradients; or bf16/fp16 (the kernel's statistics are fp32, autograd's composite handles
    # the mix) or mixed dtypes (no fused kernel): PyTorch's own.
    return F.rms_norm(x, weight.shape, weight, eps)


def _saved_tensors_hooked() -> bool:
    """Whether saved-tensor hooks are on (activation checkpointing, offloading): they decide
    what is kept then, and a tensor they never keep needs no dropping."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _releasable(made: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether `made`'s memory may be released until `out`'s backward: not under torch.compile
    (which chooses what to recompute itself), not without gradients, not when saved-tensor hooks
    (activation checkpointing) manage what is kept."""
    # is_compiling() first: dynamo folds it to True and traces none of the rest (reading
    # `grad_fn` or the hooks' state inside a compiled block would break its graph).
    return (not torch.compiler.is_compiling() and made.requires_grad and out.grad_fn is not None
            and not _saved_tensors_hooked())


def _release_until_backward(made: torch.Tensor, out: torch.Tensor,
                            remake: Callable[[torch.Tensor], None]) -> None:
    """Release `made`'s memory now; just before `out`'s backward node runs, a hook allocates it
    again and `remake(target)` writes the same values into `target`, a tensor on that memory.

    The layers that made `out` from `made` keep `made` for their backward and read it only there,
    after `out`'s node (the idea of Megatron-LM's CheckpointWithoutOutput). Nothing else may hold
    `made`: a forward hook that keeps a layer's input would see released memory."""
    nbytes = made.untyped_storage().nbytes()
    made.untyped_storage().resize_(0)
    # Held for the hook until it runs, then let go: backward frees what `remake` reads as soon as
    # its own nodes are done with it, not with the whole graph.
    pending = [made, remake]

    def refill(grad_outputs: tuple[torch.Tensor, ...]) -> None:
        if not pending:  # a second backward through a retained graph: already filled
            return
        made, remake = pending
        pending.clear()
        storage = made.untyped_storage()
        storage.resize_(nbytes)
        # A new tensor on the same memory: writing through `made` itself would bump the version
        # counter autograd checks when the layers' backward reads their saved input.
        target = torch.empty(0, dtype=made.dtype, device=made.device)
        target.set_(storage, made.storage_offset(), made.shape, made.stride())
        with torch.no_grad():
            remake(target)

    out.grad_fn.register_prehook(refill)


def swiglu_down(down: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor,
                up: torch.Tensor) -> torch.Tensor:
    """down(silu(gate) * up), the Llama MLP's output, without keeping silu(gate) * up for backward.

    `down` (a linear layer, plain or LoRA) keeps its input, the product, for its weight gradient,
    while `swiglu` keeps gate and up, from which the product is one pass away: its memory is
    released once `down` has run and filled again just before down's backward."""
    product = swiglu(gate, up)
    out = down(product)
    if _releasable(product, out):
        def remake(target: torch.Tensor) -> None:
            silu = F.silu(gate)
            torch.mul(silu, up, out=target)
            # swiglu's backward, next but one, needs silu(gate) too: one exp pass, not two.
            product.grad_fn.silu = silu

        _release_until_backward(product, out, remake)
    return out


def normed_then(norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                use: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """use(norm(x)) without keeping norm(x) for backward.

    The projections in `use` keep the normed input for their weight gradients, while the norm
    keeps x: the normed tensor is released once `use` has run and made again from x (the same
    values, bit for bit) just before use's backward."""
    normed = norm(x)
    out = use(normed)
    if _releasable(normed, out):
        def remake(target: torch.Tensor) -> None:
            if type(normed.grad_fn) is _RMSNorm._backward_cls and normed.device.type == "cpu":
                # On CPU the kernel ends in these two products (bit for bit, a test holds it):
                # with the kept 1 / rms(x) no reduction runs again.
                x_kept, weight, rstd = normed.grad_fn.saved_tensors
                torch.mul(x_kept, rstd, out=target).mul_(weight)
            else:
                target.copy_(norm(x))

        _release_until_backward(normed, out, remake)
    return out
