"""LoRA: adapters against closed forms (B = 0, W + (alpha/r) B A) and against peft on the
Hugging Face export; LoRA checkpoints, `lora merge` and `export peft` round trips."""

from __future__ import annotations

import json

import pytest
import torch

import lmforge
from lmforge.checkpoint import save_model
from lmforge.cli import main
from lmforge.config import load_config
from lmforge.errors import ConfigError, UserError
from lmforge.finetune import lora
from lmforge.hashing import file_sha256
from lmforge.interop.hf import export_hf
from lmforge.model import Transformer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = ["model.vocab_size=300", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.max_seq_len=64"]
ALL = ["q", "k", "v", "o", "gate", "up", "down"]


def config(*overrides: str):
    return load_config(overrides=[*SMALL, "lora.rank=4", "lora.alpha=8", *overrides])


def base_model(cfg, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg.model).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Nonzero B (and fresh A): an adapter that changes the model, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * 0.2)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.2)


def as_if_trained(model: torch.nn.Module) -> torch.nn.Module:
    """Random nonzero adapters, and the tensors that train in full (embeddings / head) moved."""
    randomize_adapters(model)
    with torch.no_grad():
        for name, p in lora.trainable_parameters(model).items():
            if ".lora_" not in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    return model


def lora_model(cfg, seed: int = 0) -> Transformer:
    return as_if_trained(lora.apply_lora(base_model(cfg, seed), cfg.lora))


def tokens(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------
# Closed forms


def test_zero_B_gives_exactly_the_base_model():
    cfg = config("lora.dropout=0.1")
    base = base_model(cfg)
    x = tokens()
    with torch.no_grad():
        expected = base(x)
        adapted = lora.apply_lora(base, cfg.lora).eval()
        assert len(lora.lora_layers(adapted)) == 2 * len(ALL)
        assert all((layer.lora_B == 0).all() and (layer.lora_A != 0).any()
                   for layer in lora.lora_layers(adapted).values())
        assert torch.equal(adapted(x), expected)


def test_merged_weights_are_W_plus_scaled_BA_and_unmerge_restores_them_exactly():
    cfg = config("lora.rank=3", "lora.alpha=5")
    model = lora_model(cfg)
    layers = lora.lora_layers(model)
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    x = tokens()
    with torch.no_grad():
        unmerged_logits = model(x)
        lora.merge(model)
        for name, layer in layers.items():
            W, A, B = before[name].double(), layer.lora_A.double(), layer.lora_B.double()
            expected = W + (5 / 3) * B @ A
            assert torch.allclose(layer.weight.double(), expected, atol=1e-6, rtol=0)
            assert not torch.equal(layer.weight, before[name])
        # Merged, the adapters are inside the weights: the same function.
        assert (model(x) - unmerged_logits).abs().max() <= 1e-4
        lora.unmerge(model)
        for name, layer in layers.items():
            assert torch.equal(layer.weight, before[name])
        assert torch.equal(model(x), unmerged_logits)


def test_merge_lora_gives_a_plain_transformer_with_the_merged_weights():
    cfg = config()
    model = lora_model(cfg)
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        plain = lora.merge_lora(model)
        assert not lora.lora_layers(plain)
        assert set(plain.state_dict()) == set(Transformer(cfg.model).state_dict())
        assert (plain(x) - expected).abs().max() <= 1e-4
    assert all(p.requires_grad for p in plain.parameters())


@pytest.mark.parametrize("extra, full", [
    ((), set()),
    (("lora.train_embeddings=true",), {"embed_tokens.weight"}),
    (("lora.train_head=true",), {"embed_tokens.weight"}),  # tied: the head is the embedding
    (("lora.train_head=true", "model.tie_embeddings=false"), {"lm_head.weight"}),
])
def test_only_adapters_and_chosen_modules_train(extra, full):
    cfg = config("lora.targets=q,v,down", *extra)
    model = lora.apply_lora(base_model(cfg), cfg.lora)
    trainable = lora.trainable_parameters(model)
    adapters = {f"layers.{i}.{path}.lora_{m}" for i in range(2)
                for path in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj") for m in "AB"}
    assert set(trainable) == adapters | full
    # The closed-form count: r (in + out) per adapted layer.
    d, kv, ff = 64, 2 * 16, cfg.model.ffn_dim
    count = 2 * 4 * ((d + d) + (d + kv) + (ff + d)) + sum(300 * d for _ in full)
    assert sum(p.numel() for p in trainable.values()) == count
    total = sum(p.numel() for p in model.parameters())
    assert lora.describe_trainable(model).startswith(f"{count / total:.2%} of ")
    # Gradients reach exactly the trainable tensors.
    randomize_adapters(model)
    model.train()
    model.loss(tokens(), tokens(4)).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(trainable)


def test_rank_zero_is_full_fine_tuning():
    cfg = config("lora.rank=0")
    model = base_model(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    lora.apply_lora(model, cfg.lora)
    assert not lora.lora_layers(model)
    assert set(lora.trainable_parameters(model)) == {n for n, _ in model.named_parameters()}
    assert lora.describe_trainable(model).startswith("100.00% of ")


def test_bf16_base_keeps_fp32_adapters():
    cfg = config()
    model = lora.apply_lora(base_model(cfg).to(torch.bfloat16), cfg.lora)
    layer = next(iter(lora.lora_layers(model).values()))
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    randomize_adapters(model)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = x.double() @ layer.weight.double().T + (8 / 4) * x.double() @ (layer.lora_B.double() @ layer.lora_A.double()).T
    assert (y.double() - expected).abs().max() <= 0.05 * expected.abs().max()
    before = layer.weight.detach().clone()
    layer.merge()
    layer.unmerge()
    assert torch.equal(layer.weight, before)


def test_a_target_the_model_lacks_is_one_user_error():
    cfg = config("model.arch=gpt2", "lora.targets=q,gate")
    with pytest.raises(UserError, match=r"lora.targets: 'gate' is not a layer of this model \(model.arch='gpt2'"):
        lora.apply_lora(base_model(cfg), cfg.lora)
    with pytest.raises(ConfigError, match="lora.targets='qkv' must be one of"):
        config("lora.targets=q,qkv")
    with pytest.raises(ConfigError, match="lora.rank=-1"):
        config("lora.rank=-1")


def test_adapters_round_trip_by_name():
    cfg = config("lora.train_embeddings=true")
    model = lora_model(cfg)
    state = {k: v.clone() for k, v in lora.adapter_state(model).items()}
    fresh = lora.apply_lora(base_model(cfg), cfg.lora)
    lora.load_adapters(fresh, state, "test")
    x = tokens()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    del state[next(iter(state))]
    with pytest.raises(UserError, match="is missing"):
        lora.load_adapters(fresh, state, "test")


# --------------------------------------------------------------------------------------------
# Against peft on the Hugging Face export


def peft_twin(model: Transformer, cfg, hf_dir):
    """peft's own LoRA on our exported base, holding the same adapter tensors as `model`."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    targets = [lora.TARGET_MODULES[t].rpartition(".")[2] for t in cfg.lora.targets]
    twin = peft.get_peft_model(hf, peft.LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                                   target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():
        for path, layer in lora.lora_layers(model).items():
            theirs = twin.base_model.model.model.get_submodule(path)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    return twin.eval()


@pytest.mark.parametrize("overrides", [
    ("lora.targets=q,k,v,o,gate,up,down",),
    ("lora.targets=k,o,up", "lora.rank=2", "lora.alpha=7", "model.tie_embeddings=false"),
    ("lora.targets=q,v,down", "model.qk_norm=true"),
])
def test_equals_peft_before_and_after_merge(tmp_path, overrides):
    cfg = config(*overrides)
    base = save_model(base_model(cfg), cfg, tmp_path / "base")
    model = lora.apply_lora(lmforge.load_model(base), cfg.lora)
    randomize_adapters(model)
    twin = peft_twin(model, cfg, export_hf(base, tmp_path / "hf"))
    x = tokens()
    with torch.no_grad():
        ours, theirs = model(x), twin(x).logits
        assert (ours - lmforge.load_model(base)(x)).abs().max() > 1e-2  # the adapters matter
        assert (ours - theirs).abs().max() <= 1e-4
        lora.merge(model)
        merged_theirs = twin.merge_and_unload()(x).logits
        assert (model(x) - merged_theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("bias", [False, True])
def test_the_adapted_layer_equals_its_formula_with_gradients(bias):
    """LoRALinear (training, no dropout: the one-product path) against y = x W^T + b +
    (alpha/r) (x A^T) B^T written out here, in value and in the gradients of x, A and B."""
    g = torch.Generator().manual_seed(7)
    layer = lora.LoRALinear(torch.nn.Linear(24, 40, bias=bias), rank=3, alpha=5.0, dropout=0.0).train()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(40, 3, generator=g))
    x = torch.randn(2, 9, 24, generator=g, requires_grad=True)
    upstream = torch.randn(2, 9, 40, generator=g)
    params = (x, layer.lora_A, layer.lora_B)
    got = layer(x)
    got_grads = torch.autograd.grad(got, params, upstream)
    want = x @ layer.weight.T + (5.0 / 3) * (x @ layer.lora_A.T) @ layer.lora_B.T
    if bias:
        want = want + layer.bias
    want_grads = torch.autograd.grad(want, params, upstream)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert layer.weight.grad is None  # the base stays frozen


@pytest.mark.parametrize("bf16_base", [False, True], ids=["fp32-base", "bf16-base"])
def test_the_adapted_layer_under_autocast_equals_its_formula_with_gradients(bf16_base):
    """The two-path form under bf16 autocast (how a GPU trains) against the same formula in
    float64 on the bf16-rounded operands: the value and the gradients of x, A and B, to bf16's
    precision. The scale must apply once, and the adapters' gradients arrive in fp32."""
    g = torch.Generator().manual_seed(8)
    layer = lora.LoRALinear(torch.nn.Linear(48, 40, bias=True), rank=4, alpha=8.0, dropout=0.0).train()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(40, 4, generator=g))
    if bf16_base:
        layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    x = torch.randn(3, 7, 48, generator=g, requires_grad=True)
    upstream = torch.randn(3, 7, 40, generator=g)
    params = (x, layer.lora_A, layer.lora_B)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
    got_grads = torch.autograd.grad(got, params, upstream)
    assert got.dtype == torch.bfloat16 and [t.dtype for t in got_grads] == [torch.float32] * 3
    x64, A, B = (t.detach().bfloat16().double().requires_grad_() for t in params)
    W, b = layer.weight.detach().bfloat16().double(), layer.bias.detach().bfloat16().double()
    want = x64 @ W.T + b + 2.0 * (x64 @ A.T) @ B.T
    want_grads = torch.autograd.grad(want, (x64, A, B), upstream.double())
    scale = want.abs().max()
    assert (got.double() - want).abs().max() <= 0.02 * scale
    for a, w in zip(got_grads, want_grads):
        assert (a.double() - w).abs().max() <= 0.02 * w.abs().max()


def test_adapter_gradients_equal_peft(tmp_path):
    """The training step's side: the masked loss of the SFT objective (head at the counted
    targets only) gives the same gradient of every lora_A / lora_B as peft's model on the same
    weights with the plain masked cross-entropy."""
    from lmforge.model import loss_positions

    cfg = config("lora.targets=q,k,v,o,gate,up,down")
    base = save_model(base_model(cfg), cfg, tmp_path / "base")
    model = lora.apply_lora(lmforge.load_model(base), cfg.lora).train()
    randomize_adapters(model)
    twin = peft_twin(model, cfg, export_hf(base, tmp_path / "hf")).train()
    x = tokens()
    y = tokens(seed=4)
    y[:, :10] = -100  # a prompt
    model.loss(x, y, positions=loss_positions(y)).backward()
    logits = twin(x).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    for path, layer in lora.lora_layers(model).items():
        theirs = twin.base_model.model.model.get_submodule(path)
        for ours, their in ((layer.lora_A, theirs.lora_A["default"].weight),
                            (layer.lora_B, theirs.lora_B["default"].weight)):
            assert ours.grad.abs().max() > 0
            torch.testing.assert_close(ours.grad, their.grad, atol=1e-6, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# LoRA checkpoints and the commands


def lora_run(tmp_path, *overrides: str):
    """A base checkpoint and a run directory whose newest checkpoint is a LoRA checkpoint."""
    cfg = config(*overrides)
    base = save_model(base_model(cfg), cfg, tmp_path / "base")
    model = as_if_trained(lora.apply_lora(lmforge.load_model(base), cfg.lora))
    run = tmp_path / "run"
    for step in (5, 10):
        ckpt = lora.save_lora_checkpoint(model, cfg, run / "checkpoints" / f"step_{step:08d}",
                                         lora.base_reference(base))
        (ckpt / "COMPLETE").write_text("")
    return base, run, model


def test_load_model_merges_a_lora_checkpoint_and_lora_merge_writes_a_plain_one(tmp_path, capsys):
    base, run, model = lora_run(tmp_path)
    newest = run / "checkpoints" / "step_00000010"
    assert sorted(p.name for p in newest.iterdir()) == ["COMPLETE", "config.json", "lora.json", "lora.safetensors"]
    meta = json.loads((newest / "lora.json").read_text())
    assert meta["base"] == {"checkpoint": str(base.resolve()), "sha256": file_sha256(base / "model.safetensors")}
    x = tokens()
    with torch.no_grad():
        expected = model(x)
        loaded = lmforge.load_model(run)
        assert not lora.lora_layers(loaded)
        assert (loaded(x) - expected).abs().max() <= 1e-4
    assert main(["lora", "merge", "--checkpoint", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = tmp_path / "merged"
    assert (merged / "model.safetensors").is_file() and not (merged / "lora.json").exists()
    record = json.loads((merged / "merged_from.json").read_text())
    assert record["base"]["sha256"] == file_sha256(base / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(lmforge.load_model(merged)(x), loaded(x))
    # Resuming needs the adapted model itself: base frozen, the same adapters trainable.
    adapted = lora.load_lora_model(run, merged=False)
    assert set(lora.trainable_parameters(adapted)) == set(lora.adapter_state(model))
    # A plain checkpoint has nothing to merge: one line, exit 2.
    capsys.readouterr()
    assert main(["lora", "merge", "--checkpoint", str(base), "--out", str(tmp_path / "m2")]) == 2
    err = capsys.readouterr().err
    assert "is not a LoRA checkpoint" in err and len(err.strip().splitlines()) == 1


def test_a_changed_base_is_refused(tmp_path):
    base, run, _ = lora_run(tmp_path)
    cfg = config()
    save_model(base_model(cfg, seed=7), cfg, base, overwrite=True)
    with pytest.raises(UserError, match="changed since the adapters"):
        lmforge.load_model(run)


@pytest.mark.parametrize("overrides", [
    ("lora.targets=q,k,v,o,gate,up,down",),
    ("lora.targets=q,up", "lora.train_embeddings=true"),
    ("lora.targets=v,gate", "lora.train_head=true", "lora.train_embeddings=true", "model.tie_embeddings=false"),
])
def test_export_peft_loads_in_peft_on_the_hf_export_of_the_base(tmp_path, overrides):
    base, run, model = lora_run(tmp_path, *overrides)
    hf_dir = export_hf(base, tmp_path / "hf")
    assert main(["export", "peft", "--checkpoint", str(run), "--out", str(tmp_path / "adapter")]) == 0
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "LORA" and config_json["r"] == 4 and config_json["lora_alpha"] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    assert sorted(loaded.peft_config["default"].target_modules) == sorted(
        lora.TARGET_MODULES[t].rpartition(".")[2] for t in model_targets(overrides))
    x = tokens()
    with torch.no_grad():
        assert (loaded(x).logits - model(x)).abs().max() <= 1e-4
        # export hf of the LoRA checkpoint itself is the merged model
        merged_hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf2")).eval()
        assert (merged_hf(x).logits - model(x)).abs().max() <= 1e-4


def model_targets(overrides) -> list[str]:
    return next(o for o in overrides if o.startswith("lora.targets=")).split("=")[1].split(",")


def test_export_peft_of_a_plain_checkpoint_is_one_user_error(tmp_path, capsys):
    cfg = config()
    base = save_model(base_model(cfg), cfg, tmp_path / "base")
    assert main(["export", "peft", "--checkpoint", str(base), "--out", str(tmp_path / "a")]) == 2
    assert "is not a LoRA checkpoint" in capsys.readouterr().err


def test_a_few_steps_on_the_adapters_alone_fit_a_batch():
    cfg = config("lora.rank=8", "lora.alpha=16")
    model = lora.apply_lora(base_model(cfg), cfg.lora).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model).values(), lr=1e-2)
    x, y = tokens(5), tokens(6)
    losses = []
    for _ in range(30):
        loss = model.loss(x, y)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0] - 0.5  # nats: B starts at zero, so any fit is the adapters'
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_bf16_base_trains_its_fp32_adapters_under_autocast():
    cfg = config()
    model = lora.apply_lora(base_model(cfg).to(torch.bfloat16), cfg.lora).train()
    randomize_adapters(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(tokens(), tokens(4))
    loss.backward()
    grads = [p.grad for p in lora.trainable_parameters(model).values()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_a_bf16_run_holds_the_frozen_base_in_bf16_with_the_same_results(dtype):
    """prepare_for_training keeps a bf16 run's frozen linear weights in bf16: autocast rounds them
    to bf16 at every product anyway, so the loss and the adapters' gradients are the same bits as
    with the fp32 base; embeddings, norms and adapters stay fp32. An fp32 run casts nothing."""
    import copy

    from lmforge.train.loop import prepare_for_training

    cfg = config(f"train.dtype={dtype}")
    held = lora_model(cfg).train()
    plain = copy.deepcopy(held)
    prepare_for_training(held, cfg.train, torch.device("cpu"))
    frozen = [layer.weight.dtype for layer in lora.lora_layers(held).values()]
    assert frozen == [torch.bfloat16 if dtype == "bf16" else torch.float32] * len(frozen)
    assert {p.dtype for p in lora.trainable_parameters(held).values()} == {torch.float32}
    assert held.embed_tokens.weight.dtype == held.norm.weight.dtype == torch.float32
    losses = []
    for model in (plain, held):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model.loss(tokens(), tokens(4))
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, a), b in zip(lora.trainable_parameters(plain).items(), lora.trainable_parameters(held).values(),
                            strict=True):
        assert torch.equal(a.grad, b.grad), name


def test_sample_reads_a_lora_checkpoint_as_its_merged_model(tmp_path, capsys):
    from lmforge.tokenizer.train import train_tokenizer

    tokenizer = tmp_path / "tok"
    train_tokenizer(["the adapters and the base model, merged or not"] * 20, vocab_size=300).save(tokenizer)
    cfg = config()
    base = save_model(base_model(cfg), cfg, tmp_path / "base", tokenizer_dir=tokenizer)
    model = lora_model(cfg)
    ckpt = lora.save_lora_checkpoint(model, cfg, tmp_path / "lora", lora.base_reference(base), tokenizer)
    assert main(["lora", "merge", "--checkpoint", str(ckpt), "--out", str(tmp_path / "merged")]) == 0
    outputs = {}
    for name in ("lora", "merged", "base"):
        capsys.readouterr()
        assert main(["sample", "--checkpoint", str(tmp_path / name), "--prompt", "the",
                     "--max-new-tokens", "12", "--temperature", "0"]) == 0
        outputs[name] = capsys.readouterr().out
    assert outputs["lora"] == outputs["merged"] != outputs["base"]
