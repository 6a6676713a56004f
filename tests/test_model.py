"""The transformer against independent truths: Hugging Face Llama/Qwen3 on the same weights,
full-sequence logits (for the KV cache), causality, the RoPE relative-position property, and the
real parameter count (for the accounting)."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.accounting import param_counts
from lmforge.config import ModelConfig, load_config
from lmforge.engine import KVCache, generate, stream
from lmforge.model import (
    FusedHeadLoss,
    Transformer,
    apply_rope,
    fused_head_loss,
    loss_positions,
    rope_tables,
)

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, rope_theta=5000.0)
CASES = {
    "mha-tied": dict(),
    "gqa-untied": dict(n_kv_heads=2, tie_embeddings=False),
    "mqa": dict(n_kv_heads=1),
    "qk-norm-gqa": dict(qk_norm=True, n_kv_heads=2, tie_embeddings=False),
    "odd-sizes": dict(d_model=96, n_heads=3, vocab_size=1000, d_ff=200, n_layers=3, norm_eps=1e-6),
}


def make(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **overrides})
    model = Transformer(cfg)
    with torch.no_grad():  # norms start at 1; perturb them so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_reference(model: Transformer):
    """The same network built by transformers from its own config class, our weights copied in."""
    c = model.cfg
    cls_config, cls_model = (
        (transformers.Qwen3Config, transformers.Qwen3ForCausalLM) if c.qk_norm
        else (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    )
    config = cls_config(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ffn_dim,
        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
        head_dim=c.d_model // c.n_heads, max_position_embeddings=c.max_seq_len, rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings, attn_implementation="eager",
    )
    hf = cls_model(config).eval()
    state = {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in model.state_dict().items()}
    result = hf.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys == ([] if not c.tie_embeddings else ["lm_head.weight"])
    if c.tie_embeddings:
        hf.tie_weights()
        assert torch.equal(hf.lm_head.weight, model.embed_tokens.weight)
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case):
    model = make(**CASES[case])
    hf = hf_reference(model)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == (2, 37, model.cfg.vocab_size)
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_loss_matches_transformers_and_ignores_index():
    model = make(n_kv_heads=2)
    hf = hf_reference(model)
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    targets[0, :5] = -100
    with torch.no_grad():
        ours = model.loss(idx, targets)
        theirs = hf(idx, labels=targets, shift_labels=targets).loss
        per_token = model.loss(idx, targets, reduction="none")
        total = model.loss(idx, targets, reduction="sum")
    assert abs(ours.item() - theirs.item()) <= 1e-5
    assert per_token.shape == (2, 16)
    assert torch.all(per_token[targets == -100] == 0)
    kept = targets != -100
    assert torch.allclose(per_token[kept].mean(), ours)
    assert torch.allclose(per_token.sum(), total)


@pytest.mark.parametrize("case", ["mha-tied", "gqa-untied"])
def test_fused_loss_gradients_match_transformers(case):
    """The fused head + loss (train.fused_loss) gives transformers' loss and gradients."""
    model = make(**CASES[case]).train()
    hf = hf_reference(model).train()
    idx = torch.randint(0, model.cfg.vocab_size, (3, 21), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=1)
    targets[:, -1] = -100
    targets[1, :7] = -100
    ours = model.loss(idx, targets, head_loss=functools.partial(model.head_loss, fused=True))
    theirs = hf(idx, labels=targets, shift_labels=targets).loss
    ours.backward()
    theirs.backward()
    assert abs(ours.item() - theirs.item()) <= 1e-5
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        ref = hf_params.get(name if name.startswith("lm_head.") else f"model.{name}")
        assert torch.allclose(p.grad, ref.grad, atol=1e-6, rtol=1e-4), name


@pytest.mark.parametrize("fused", [True, False], ids=["fused-head", "plain-head"])
@pytest.mark.parametrize("case", ["mha-tied", "gqa-untied", "gpt2-checkpointed"])
def test_loss_at_positions_equals_the_masked_loss_of_full_logits(case, fused):
    """`model.loss(..., positions=loss_positions(targets))` (the head, and the last block past
    its attention, at the counted targets only, as SFT trains) gives the masked mean
    cross-entropy of the full logits, computed directly here, and the same gradients for every
    parameter; "none" gives each counted target's loss in order."""
    checkpointed = case == "gpt2-checkpointed"
    model = make(**(dict(arch="gpt2") if checkpointed else CASES[case])).train()
    g = torch.Generator().manual_seed(6)
    idx = torch.randint(0, model.cfg.vocab_size, (3, 19), generator=g)
    targets = torch.randint(0, model.cfg.vocab_size, (3, 19), generator=g)
    targets[torch.rand(3, 19, generator=g) < 0.5] = -100  # prompts, padding: not counted
    targets[2] = -100  # a row with nothing to learn
    counted = targets != -100
    logits = model(idx)
    direct = F.cross_entropy(logits[counted], targets[counted])
    direct_grads = torch.autograd.grad(direct, list(model.parameters()))
    positions = loss_positions(targets)
    assert positions.tolist() == [i for i, t in enumerate(targets.flatten().tolist()) if t != -100]
    rows_seen = []

    def head_loss(h, *args):  # the model's own head loss, recording how many rows reach it
        rows_seen.append(h.shape[:-1].numel())
        return model.head_loss(h, *args, fused=fused)

    mlp_rows = []  # how many rows each block's MLP saw
    for block in model.layers.values():
        block.mlp.register_forward_hook(lambda _, args, out: mlp_rows.append(args[0].shape[:-1].numel()))
    loss = model.loss(idx, targets, head_loss=head_loss, positions=positions, checkpoint_blocks=checkpointed)
    assert rows_seen == [int(counted.sum())]  # the head ran at the counted targets only
    # ... and so did the last block's MLP (the others at every position).
    assert mlp_rows[:len(model.layers)] == [idx.numel()] * (len(model.layers) - 1) + [int(counted.sum())]
    grads = torch.autograd.grad(loss, list(model.parameters()))
    assert torch.allclose(loss, direct, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), grads, direct_grads):
        assert torch.allclose(got, want, atol=1e-7, rtol=1e-4), name
    with torch.no_grad():
        per_target = model.loss(idx, targets, reduction="none", positions=positions)
        expected = F.cross_entropy(model(idx)[counted], targets[counted], reduction="none")
    assert per_target.shape == (int(counted.sum()),)
    assert torch.allclose(per_target, expected, atol=1e-6)


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 1000])
def test_fused_head_loss_equals_cross_entropy_for_any_chunking(chunk_rows):
    g = torch.Generator().manual_seed(4)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(300, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 300, (50,), generator=g)
    targets[::6] = -1
    ref = F.cross_entropy(F.linear(h, w), targets, ignore_index=-1)
    ref_grads = torch.autograd.grad(ref * 3.0, (h, w))  # an upstream gradient other than 1
    out = FusedHeadLoss.apply(h, w, targets, -1, chunk_rows)
    grads = torch.autograd.grad(out * 3.0, (h, w))
    assert torch.allclose(out, ref, atol=1e-6)
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


def test_fused_head_loss_under_autocast_and_with_a_frozen_head():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(40, 32, generator=g, requires_grad=True)
    w = torch.randn(500, 32, generator=g)  # frozen: no gradient asked for, none computed
    targets = torch.randint(0, 500, (40,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(F.linear(h, w).float(), targets)
        out = fused_head_loss(h, w, targets)
    (ref_grad,), (grad,) = torch.autograd.grad(ref, h), torch.autograd.grad(out, h)
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    assert abs(out.item() - ref.item()) <= 1e-3 * ref.item()
    assert torch.allclose(grad, ref_grad, atol=1e-4)
    # Every target ignored: a zero loss with zero gradients, not 0/0.
    none = fused_head_loss(h, w, torch.full((40,), -100))
    assert none.item() == 0.0 and not torch.autograd.grad(none, h)[0].any()


@pytest.mark.parametrize("case", ["mha-tied", "gqa-untied"])
def test_the_head_into_a_given_tensor_is_the_linear_map(case):
    """What the CPU engine's eager step does with the logits buffer it reuses: the head written
    into `out` is h times the head's weight, as F.linear computes it, in the tensor given."""
    model = make(**CASES[case])
    h = torch.randn(5, model.cfg.d_model)
    out = torch.full((5, model.cfg.vocab_size), float("nan"))
    with torch.no_grad():
        logits = model.head(h, out=out)
        assert logits.data_ptr() == out.data_ptr()
        torch.testing.assert_close(logits, F.linear(h, model.head_weight()), rtol=0, atol=0)
        torch.testing.assert_close(model.head(h), logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["mha-tied", "qk-norm-gqa"])
def test_kv_cache_reproduces_full_sequence_logits(case):
    model = make(**CASES[case])
    idx = torch.randint(0, model.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.cfg, batch_size=2, max_len=24, device="cpu", dtype=torch.float32)
        parts = [model(idx[:, :10], cache)]  # prefill
        parts.append(model(idx[:, 10:15], cache))  # a chunk after cached tokens: needs the mask
        parts += [model(idx[:, t:t + 1], cache) for t in range(15, 24)]  # one token at a time
    assert cache.pos == 24
    assert (torch.cat(parts, dim=1) - full).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causality(arch):
    model = make(arch=arch, n_kv_heads=2)
    idx = torch.randint(0, 512, (1, 20), generator=torch.Generator().manual_seed(4))
    changed = idx.clone()
    changed[0, 12] = (idx[0, 12] + 1) % 512
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    cos, sin = rope_tables(head_dim, 64, theta=10000.0)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)

    def score(m: int, n: int) -> float:
        qm = apply_rope(q.view(1, 1, 1, -1), cos[m:m + 1], sin[m:m + 1]).flatten()
        kn = apply_rope(k.view(1, 1, 1, -1), cos[n:n + 1], sin[n:n + 1]).flatten()
        return float(qm @ kn)

    for offset in (0, 3, 17):
        scores = [score(n + offset, n) for n in (0, 5, 20, 40)]
        assert max(scores) - min(scores) < 1e-4
    assert abs(score(10, 0) - score(3, 0)) > 1e-3  # and it does depend on the offset
    # A rotation keeps the vector's length.
    rotated = apply_rope(q.view(1, 1, 1, -1), cos[7:8], sin[7:8])
    assert torch.allclose(rotated.norm(), q.norm(), atol=1e-5)


def test_greedy_generate_matches_recomputing_the_whole_sequence():
    model = make(n_kv_heads=2)
    prompt = torch.randint(0, 512, (2, 5), generator=torch.Generator().manual_seed(6))
    out = generate(model, prompt, max_new_tokens=12, temperature=0)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :5], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):  # no cache: the independent truth
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert list(stream(model, prompt[0].tolist(), 12, temperature=0)) == seq[0, 5:].tolist()


def test_sampling_is_seeded_and_filters_work():
    model = make()
    prompt = torch.tensor([[1, 2, 3]])
    greedy = generate(model, prompt, 10, temperature=0)

    def sample(seed: int, **kw) -> torch.Tensor:
        return generate(model, prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2)) or not torch.equal(sample(1), sample(3))
    assert torch.equal(sample(4, top_k=1), greedy)  # top-1 keeps only the best token
    assert torch.equal(sample(5, top_p=1e-6), greedy)  # a tiny nucleus keeps only the best token
    allowed = model(prompt)[0, -1].topk(5).indices.tolist()
    for seed in range(5):
        assert sample(seed, top_k=5)[0, 3].item() in allowed


def test_stop_tokens_end_generation():
    model = make()
    prompt = torch.tensor([[7, 8, 9]])
    free = generate(model, prompt, 10, temperature=0)[0, 3:].tolist()
    stop = free[3]
    first = free.index(stop)
    out = generate(model, prompt, 10, temperature=0, stop_tokens=[stop])
    assert out[0, 3:].tolist() == free[:first + 1]  # the stop token is kept, then it ends
    assert list(stream(model, [7, 8, 9], 10, temperature=0, stop_tokens=[stop])) == free[:first]
    # Generation never runs past the context.
    long = generate(model, torch.zeros(1, 60, dtype=torch.long), 50, temperature=0)
    assert long.shape == (1, model.cfg.max_seq_len)


def test_initialisation_std_and_residual_scaling():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=2048, d_model=256, n_layers=8, n_heads=4)
    model = Transformer(cfg)
    std = lambda t: t.float().std().item()  # noqa: E731
    assert abs(std(model.embed_tokens.weight) - 0.02) < 0.001
    assert abs(std(model.layers["0"].self_attn.q_proj.weight) - 0.02) < 0.001
    scaled = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert abs(std(model.layers["3"].self_attn.o_proj.weight) - scaled) < 0.0005
    assert abs(std(model.layers["3"].mlp.down_proj.weight) - scaled) < 0.0005
    assert torch.all(model.norm.weight == 1)
    unscaled = Transformer(ModelConfig(**{**cfg.__dict__, "scale_residual_init": False}))
    assert abs(std(unscaled.layers["3"].mlp.down_proj.weight) - 0.02) < 0.001


def test_parameter_names_are_llama_names():
    model = make(qk_norm=True, tie_embeddings=False, n_layers=1)
    assert set(model.state_dict()) == {
        "embed_tokens.weight", "norm.weight", "lm_head.weight",
        "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
        *(f"layers.0.self_attn.{p}_proj.weight" for p in "qkvo"),
        "layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight",
        *(f"layers.0.mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    }
    assert "lm_head.weight" not in make(n_layers=1).state_dict()  # tied: no separate head


def test_pipeline_stages_compose_to_the_full_model():
    model = make(n_layers=4, tie_embeddings=False)
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(7))
    first, last = make(n_layers=4, tie_embeddings=False), make(n_layers=4, tie_embeddings=False)
    for stage in (first, last):
        stage.load_state_dict(model.state_dict())
    for i in ("2", "3"):
        del first.layers[i]
    for i in ("0", "1"):
        del last.layers[i]
    first.norm = first.lm_head = None
    last.embed_tokens = None
    with torch.no_grad():
        hidden = first(idx)
        assert hidden.shape == (2, 12, 64)
        assert torch.allclose(last(hidden), model(idx), atol=1e-6)


def test_gpt2_arch_forward_backward():
    model = make(arch="gpt2", n_kv_heads=2).train()
    assert model.embed_positions is not None and model.rope_cos is None
    assert isinstance(model.norm, torch.nn.LayerNorm)
    idx = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(8))
    loss = model.loss(idx[:, :-1], idx[:, 1:])
    assert abs(loss.item() - math.log(512)) < 0.5  # near uniform at init
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert generate(model, idx[:1, :4], 5, temperature=0).shape == (1, 9)
    # Positions are learned: the same token at two positions gets different outputs.
    with torch.no_grad():
        out = model(torch.full((1, 2), 3))
    assert not torch.allclose(out[0, 0], out[0, 1])


def test_training_step_reduces_loss():
    model = make(n_kv_heads=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 512, (4, 33), generator=torch.Generator().manual_seed(9))
    losses = []
    for _ in range(5):
        loss = model.loss(idx[:, :-1], idx[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


@pytest.mark.parametrize("overrides", [
    {}, {"arch": "gpt2"}, {"qk_norm": True, "tie_embeddings": False, "n_kv_heads": 1},
    {"arch": "gpt2", "tie_embeddings": False, "d_ff": 100}, {"d_model": 96, "n_heads": 3, "vocab_size": 1000},
])
def test_accounting_counts_the_real_parameters(overrides):
    cfg = ModelConfig(**{**BASE, **overrides})
    model = Transformer(cfg)
    counts = param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.embedding == sum(p.numel() for n, p in model.named_parameters() if n.startswith("embed_"))
    assert counts.mlp == sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    assert counts.head == (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


@pytest.mark.parametrize("preset, low, high", [
    ("tiny", 1e6, 3e6), ("small", 15e6, 30e6), ("gpt2-124m", 110e6, 140e6),
    ("llama-1b", 1.0e9, 1.5e9), ("llama-7b", 6.5e9, 7.0e9),
])
def test_preset_sizes(preset, low, high):
    assert low <= param_counts(load_config(preset=preset).model).total <= high


def test_bf16_forward_runs_and_tracks_fp32():
    model = make(n_kv_heads=2)
    idx = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(idx)
        half = model.to(torch.bfloat16)(idx)
    assert half.dtype == torch.bfloat16
    assert F.cosine_similarity(half.float().flatten(), full.flatten(), dim=0) > 0.99


def test_decoding_under_bf16_autocast():
    """The trainer samples under bf16 autocast on GPUs: keys and values then come out of the
    projections in bf16 (and RoPE's fp32 tables promote the keys) while the weights are fp32. The
    cache must take them, and cached decoding must track the whole-sequence forward."""
    model = make(n_kv_heads=2)
    idx = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(12))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        full = model(idx).float()
        cache = KVCache(model.cfg, batch_size=2, max_len=12, device="cpu", dtype=torch.bfloat16)
        parts = [model(idx[:, :6], cache)] + [model(idx[:, t:t + 1], cache) for t in range(6, 12)]
        out = generate(model, idx, 8, temperature=0)
    assert out.shape == (2, 20) and torch.equal(out[:, :12], idx)
    cached = torch.cat(parts, dim=1).float()
    assert F.cosine_similarity(cached.flatten(), full.flatten(), dim=0) > 0.999


@pytest.mark.slow
def test_compiled_decoding_gives_the_same_tokens():
    model = make(n_layers=1, n_kv_heads=2)
    prompt = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(11))
    eager = generate(model, prompt, 20, temperature=0)
    assert torch.equal(generate(model, prompt, 20, temperature=0, compile=True), eager)
    # A second prompt of another length reuses the compiled step (dynamic cache position).
    other = prompt[:, :3]
    assert torch.equal(generate(model, other, 20, temperature=0, compile=True), generate(model, other, 20, temperature=0))
