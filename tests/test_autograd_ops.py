"""The hand-written backward passes of lmforge.autograd_ops against plain autograd on the unfused
formula (float64), and what they keep for backward (the reason they exist)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.autograd_ops import normed_then, rms_norm, swiglu, swiglu_down


def saved_storages(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `fn()` runs."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_swiglu_gradients_equal_autograd_on_the_formula():
    g = torch.Generator().manual_seed(0)
    # Values across silu's range, including exact zeros and large magnitudes.
    gate = torch.cat([torch.randn(3, 5, 40, generator=g, dtype=torch.float64) * 4,
                      torch.zeros(3, 5, 1, dtype=torch.float64),
                      torch.full((3, 5, 1), -40.0, dtype=torch.float64)], dim=-1).requires_grad_()
    up = torch.randn(3, 5, 42, generator=g, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 5, 42, generator=g, dtype=torch.float64)

    expected = F.silu(gate) * up
    want = torch.autograd.grad(expected, (gate, up), upstream)
    got_out = swiglu(gate, up)
    got = torch.autograd.grad(got_out, (gate, up), upstream)
    torch.testing.assert_close(got_out, expected, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(swiglu, (gate[:1, :2, :6].detach().requires_grad_(),
                                             up[:1, :2, :6].detach().requires_grad_()))


def test_swiglu_keeps_only_gate_and_up():
    gate = torch.randn(4, 16, 64, requires_grad=True)
    up = torch.randn(4, 16, 64, requires_grad=True)
    one = gate.numel() * gate.element_size()
    assert saved_storages(lambda: swiglu(gate, up)) == 2 * one
    assert saved_storages(lambda: F.silu(gate) * up) == 3 * one  # plain autograd also keeps silu(gate)


def test_swiglu_with_one_input_frozen():
    gate = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    up = torch.randn(2, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(swiglu(gate, up).sum(), gate)
    (want,) = torch.autograd.grad((F.silu(gate) * up).sum(), gate)
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_compiled_blocks_give_eager_loss_and_gradients():
    """The custom Function compiles (torch.compile traces it inside each block) to the same
    numbers as eager."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)
    eager, compiled = Transformer(cfg), Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    for block in compiled.layers.values():
        block.compile()
    x = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    want, got = eager.loss(x, x), compiled.loss(x, x)
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want)
    for (name, a), (_, b) in zip(compiled.named_parameters(), eager.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    torch._dynamo.reset()


class Recorded(torch.nn.Module):
    """A down projection that remembers the input it was called with."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner, self.inputs = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return self.inner(x)


def mlp_inputs(lora: bool = False):
    """Float64 gate and up outputs and a down projection (plain, or LoRA with B != 0)."""
    from lmforge.finetune.lora import LoRALinear

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    gate = (torch.randn(2, 7, 24, generator=g, dtype=torch.float64) * 3).requires_grad_()
    up = torch.randn(2, 7, 24, generator=g, dtype=torch.float64, requires_grad=True)
    down = torch.nn.Linear(24, 10, dtype=torch.float64)
    if lora:
        down = LoRALinear(down, rank=4, alpha=8.0, dropout=0.0)
        with torch.no_grad():
            down.lora_B.normal_()
    upstream = torch.randn(2, 7, 10, generator=g, dtype=torch.float64)
    return gate, up, down, upstream


@pytest.mark.parametrize("lora", [False, True])
def test_swiglu_down_releases_the_product_and_keeps_the_gradients(lora):
    gate, up, down, upstream = mlp_inputs(lora)
    params = [p for p in down.parameters() if p.requires_grad]
    want_out = down(F.silu(gate) * up)
    want = torch.autograd.grad(want_out, (gate, up, *params), upstream)
    recorded = Recorded(down)
    out = swiglu_down(recorded, gate, up)
    assert recorded.inputs[0].untyped_storage().nbytes() == 0  # released after forward
    got = torch.autograd.grad(out, (gate, up, *params), upstream)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_swiglu_down_twice_through_a_retained_graph():
    gate, up, down, upstream = mlp_inputs()
    out = swiglu_down(down, gate, up)
    first = torch.autograd.grad(out, (gate, up, down.weight), upstream, retain_graph=True)
    second = torch.autograd.grad(out, (gate, up, down.weight), upstream)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_swiglu_down_keeps_the_product_where_it_must():
    """Without gradients, and under activation checkpointing (saved-tensor hooks decide what is
    kept): the plain composition, product untouched, same gradients."""
    gate, up, down, upstream = mlp_inputs()
    with torch.no_grad():
        recorded = Recorded(down)
        swiglu_down(recorded, gate, up)
        assert recorded.inputs[0].untyped_storage().nbytes() > 0
    recorded = Recorded(down)
    out = checkpoint(swiglu_down, recorded, gate, up, use_reentrant=False)
    assert all(x.untyped_storage().nbytes() > 0 for x in recorded.inputs)
    got = torch.autograd.grad(out, (gate, up, down.weight), upstream)
    want = torch.autograd.grad(down(F.silu(gate) * up), (gate, up, down.weight), upstream)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("weight_trains", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 16), (2, 4, 3, 8)])  # (B, T, d); per head (QK-norm)
def test_rms_norm_gradients_equal_autograd_on_the_formula(weight_trains, shape):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).requires_grad_()
    weight = (torch.rand(shape[-1], generator=g, dtype=torch.float64) + 0.5).requires_grad_(weight_trains)
    upstream = torch.randn(*shape, generator=g, dtype=torch.float64)
    inputs = (x, weight) if weight_trains else (x,)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight  # unfused formula
    want = torch.autograd.grad(expected, inputs, upstream)
    got_out = rms_norm(x, weight, 1e-6)
    got = torch.autograd.grad(got_out, inputs, upstream)
    torch.testing.assert_close(got_out, expected, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_rms_norm_keeps_x_not_the_normalised_x():
    x = torch.randn(4, 16, 64, requires_grad=True)
    weight = torch.ones(64, requires_grad=True)
    one = x.numel() * x.element_size()
    assert saved_storages(lambda: rms_norm(x, weight, 1e-5)) < 1.1 * one
    assert saved_storages(lambda: F.rms_norm(x, (64,), weight, 1e-5)) > 1.9 * one


@pytest.mark.parametrize("lora", [False, True])
def test_normed_then_releases_the_normed_input_and_keeps_the_gradients(lora):
    from lmforge.model import RMSNorm

    gate, up, down, upstream = mlp_inputs(lora)  # down: (24 -> 10); its input normed here
    x = torch.randn(2, 7, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    norm = RMSNorm(24, 1e-6).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    params = [x, norm.weight, *(p for p in down.parameters() if p.requires_grad)]
    want_out = down(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight)
    want = torch.autograd.grad(want_out, params, upstream)
    recorded = Recorded(down)
    out = normed_then(norm, x, recorded)
    assert recorded.inputs[0].untyped_storage().nbytes() == 0  # released after forward
    got = torch.autograd.grad(out, params, upstream)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_a_training_forward_keeps_no_norm_output_and_no_mlp_product():
    """What a block keeps, read off the graph: per layer the two norms' inputs, q, k (after RoPE),
    v, the attention output, gate and up - not the normed inputs, silu(gate) or the product."""
    from train_fixtures import kept_for_backward

    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=96, max_seq_len=16)
    model = Transformer(cfg)
    x = torch.randint(0, 64, (2, 16))
    h = model.hidden_states(x)
    kept = kept_for_backward(h, leave_out=[*model.parameters(), *model.buffers()])
    tokens, d, f, heads = 2 * 16, 32, 96, 4
    per_layer = tokens * (2 * d + 3 * d + d + 2 * f) * 4 + tokens * heads * 4 * 2  # + rstd, log-sum-exp
    # the embedding's output is the first norm's input; the last block's output is not kept
    assert kept <= cfg.n_layers * per_layer + tokens * 8 * 4
    assert kept >= cfg.n_layers * tokens * (6 * d + 2 * f) * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_refilled_normed_input_has_the_forward_s_bits(dtype):
    """normed_then makes the normed input again from the norm's input and 1 / rms: the very
    values the forward made, so backward sees what forward used."""
    from lmforge.model import RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 9, 40, generator=g, dtype=dtype) * 3).requires_grad_()
    norm = RMSNorm(40, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=g)
    seen = []

    def use(normed: torch.Tensor) -> torch.Tensor:
        seen.append((normed, normed.detach().clone()))
        return normed * 2

    out = normed_then(norm, x, use)
    (normed, forward_values), = seen
    assert normed.untyped_storage().nbytes() == 0
    out.backward(torch.ones_like(out))  # the refill runs first
    assert torch.equal(normed.detach(), forward_values)


def _loss_and_gradients(model, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One training step's loss and every parameter's gradient (copies)."""
    model.zero_grad(set_to_none=True)
    loss = model.loss(x, x)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_releasing_changes_no_bit_of_the_model_s_gradients(arch):
    """The same training step with the releases off (any saved-tensor hooks turn them off): the
    loss and every gradient are the same bits, for RMSNorm and LayerNorm blocks alike."""
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(arch=arch, vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                                    n_kv_heads=2 if arch == "llama" else 4, max_seq_len=16))
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))

    released = _loss_and_gradients(model, x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        kept = _loss_and_gradients(model, x)
    assert torch.equal(released[0], kept[0])
    for a, b in zip(released[1], kept[1], strict=True):
        assert torch.equal(a, b)


def test_without_the_fused_kernel_the_model_trains_the_same(monkeypatch):
    """A torch without aten::_fused_rms_norm (older than the one the fused path needs) falls back
    to F.rms_norm, still with the releases: the same loss and gradients as the fused path, to
    float rounding (the two compute 1/rms in a different order)."""
    import lmforge.autograd_ops as ops
    from lmforge.config import ModelConfig
    from lmforge.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                    max_seq_len=16)).double()
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))

    fused = _loss_and_gradients(model, x)
    monkeypatch.setattr(ops, "_FUSED_RMS_NORM", False)
    composite = _loss_and_gradients(model, x)
    torch.testing.assert_close(composite[0], fused[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(composite[1], fused[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
