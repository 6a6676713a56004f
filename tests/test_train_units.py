"""Unit tests of the pre-training parts that need no data: schedules, optimizers, guard, checkpoints."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import save_file

from lmforge.config import GuardConfig, ModelConfig, RunConfig, TrainConfig, load_config
from lmforge.engine import generate
from lmforge.errors import ConfigError, UserError
from lmforge.model import Transformer
from lmforge.train.checkpoint import (
    COMPLETE,
    CheckpointManager,
    read_checkpoint,
    resolve_resume,
)
from lmforge.train.guard import FaultInjector, LossGuard, TrainingDiverged
from lmforge.train.optim import (
    Muon,
    build_optimizer,
    load_named_optimizer_state,
    named_optimizer_state,
    orthogonalize,
    param_groups,
)
from lmforge.train.schedule import lr_multiplier

TINY = ModelConfig(vocab_size=300, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=32)


# ---- schedules -------------------------------------------------------------------------------

def _curve(**kw) -> list[float]:
    cfg = TrainConfig(max_steps=100, warmup_steps=10, min_lr_ratio=0.1, **kw)
    return [lr_multiplier(s, cfg) for s in range(1, 101)]


def test_warmup_is_linear_up_to_the_peak():
    for schedule in ("cosine", "wsd", "constant"):
        curve = _curve(schedule=schedule)
        assert curve[:10] == pytest.approx([s / 10 for s in range(1, 11)])


def test_cosine_falls_monotonically_through_the_midpoint_to_the_floor():
    curve = _curve(schedule="cosine")
    decay = curve[9:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # Half way through the decay (step 55) a cosine is exactly half way between peak and floor.
    assert curve[54] == pytest.approx((1 + 0.1) / 2)
    assert curve[-1] == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    curve = _curve(schedule="wsd", decay_fraction=0.2)
    assert curve[10:80] == pytest.approx([1.0] * 70)  # steps 11..80
    tail = curve[80:]  # steps 81..100, linear down to the floor
    diffs = [a - b for a, b in zip(tail, tail[1:])]
    assert diffs == pytest.approx([diffs[0]] * len(diffs))
    assert tail[-1] == pytest.approx(0.1)


def test_constant_stays_at_the_peak():
    assert _curve(schedule="constant")[10:] == pytest.approx([1.0] * 90)


# ---- optimizers --------------------------------------------------------------------------------

def test_newton_schulz_approximates_the_polar_factor():
    torch.manual_seed(0)
    g = torch.randn(64, 32)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    out = orthogonalize(g)
    s = torch.linalg.svdvals(out)
    assert s.min() > 0.6 and s.max() < 1.25  # singular values pushed towards 1 (from a ratio of ~6)
    # It keeps g's singular vectors: in g's SVD basis the result is diagonal.
    inner = u.T @ out @ vh.T
    off_diagonal = inner - torch.diag(torch.diagonal(inner))
    assert off_diagonal.abs().max() < 1e-3
    assert torch.allclose(orthogonalize(g.T), out.T, atol=1e-5)  # wide and tall agree


def test_param_groups_keep_norms_biases_and_embeddings_out_of_weight_decay():
    cfg = ModelConfig(**{**TINY.__dict__, "arch": "gpt2", "tie_embeddings": False})
    model = Transformer(cfg)
    groups = {g["name"]: g for g in param_groups(model, TrainConfig())}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    undecayed = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] > 0
    assert "embed_tokens.weight" in undecayed and "embed_positions.weight" in undecayed
    assert all(n.endswith("bias") or "norm" in n or "embed" in n for n in undecayed)
    assert "lm_head.weight" in decayed and "layers.0.self_attn.q_proj.weight" in decayed
    assert len(decayed) + len(undecayed) == len(names)


def test_muon_takes_block_matrices_and_adamw_the_rest():
    model = Transformer(TINY)
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert isinstance(opt, Muon)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    assert muon and all(n.startswith("layers.") and n.endswith(".weight") and "norm" not in n for n in muon)
    assert "embed_tokens.weight" not in muon
    # One step on a real loss lowers it.
    x = torch.randint(0, 300, (4, 16))
    before = float(model.loss(x[:, :-1], x[:, 1:]).detach())
    for _ in range(5):
        opt.zero_grad()
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
    assert float(model.loss(x[:, :-1], x[:, 1:]).detach()) < before


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_named_optimizer_state_round_trips_into_a_fresh_optimizer(optimizer):
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer=optimizer)
    model = Transformer(TINY)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    x = torch.randint(0, 300, (2, 16))
    model.loss(x[:, :-1], x[:, 1:]).backward()
    opt.step()
    named = named_optimizer_state(model, opt)
    assert "layers.0.mlp.up_proj.weight" in named["state"]
    twin = Transformer(TINY)
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg, torch.device("cpu"))
    load_named_optimizer_state(twin, twin_opt, named)
    for m, o in ((model, opt), (twin, twin_opt)):  # the same next step on both
        o.zero_grad()
        m.loss(x[:, :-1], x[:, 1:]).backward()
        o.step()
    for (n, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), n


# ---- guard -----------------------------------------------------------------------------------

def test_guard_flags_non_finite_values_and_spikes_but_not_noise():
    guard = LossGuard(GuardConfig(window=20, threshold=6.0))
    torch.manual_seed(0)
    for v in (3.0 + 0.05 * torch.randn(20)).tolist():
        assert guard.check(v, 1.0) is None
        guard.observe(v)
    assert guard.check(3.1, 1.0) is None
    assert guard.check(30.0, 1.0) == "spike"
    assert guard.check(math.nan, 1.0) == "nan_loss"
    assert guard.check(3.0, math.inf) == "nan_grad"


def test_guard_stops_after_max_rollbacks_and_remembers_what_to_skip():
    guard = LossGuard(GuardConfig(max_rollbacks=2, skip_batches=1, lr_factor=0.5, lr_cooldown_steps=10))
    guard.rollback(40, "spike")
    guard.rollback(40, "spike")
    assert guard.batches_to_skip(40) == 2 and guard.lr_scale(50) == 0.5 and guard.lr_scale(51) == 1.0
    with pytest.raises(TrainingDiverged, match="max_rollbacks=2"):
        guard.rollback(70, "nan_loss")


def test_fault_injection_fires_once():
    faults = FaultInjector("spike@4,nan@7")
    assert faults.loss_factor(3) == 1.0
    assert faults.loss_factor(4) == FaultInjector.SPIKE_FACTOR and faults.loss_factor(4) == 1.0
    assert math.isnan(faults.loss_factor(7)) and faults.loss_factor(7) == 1.0
    with pytest.raises(ConfigError):
        load_config(overrides=["debug.inject=boom@3"])


# ---- checkpoints -----------------------------------------------------------------------------

def _save(manager: CheckpointManager, step: int, val_loss: float | None = None):
    model = Transformer(TINY)
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    cfg = RunConfig(model=TINY)
    return manager.save(step, cfg=cfg, model_state=model.state_dict(),
                        optimizer_state=named_optimizer_state(model, opt),
                        trainer_state={"step": step, "val_loss": val_loss}, tokenizer_dir=None)


def test_checkpoints_keep_the_last_k_and_the_best(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step, val in ((10, 3.0), (20, 2.0), (30, 2.5), (40, 2.6), (50, None)):
        _save(manager, step, val)
    assert [s for s, _ in manager.complete()] == [20, 40, 50]
    assert manager.latest().name == "step_00000050"
    ckpt = read_checkpoint(manager.latest())
    assert ckpt.step == 50 and "embed_tokens.weight" in ckpt.model
    import lmforge

    assert lmforge.load_model(tmp_path).cfg.d_model == TINY.d_model  # a run dir loads its newest


def test_incomplete_and_missing_checkpoints_are_clear_errors(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    path = _save(manager, 10)
    (path / COMPLETE).unlink()
    assert manager.latest() is None  # never loaded without its marker
    with pytest.raises(UserError, match="incomplete"):
        resolve_resume(tmp_path, str(path))
    with pytest.raises(UserError, match="not found"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step_00000099"))
    with pytest.raises(UserError, match="no complete checkpoint"):
        resolve_resume(tmp_path, True)


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED",))


@pytest.mark.parametrize("name", ["optimizer.safetensors", "optimizer.pt"])
def test_a_pickle_payload_in_a_checkpoint_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    path = _save(CheckpointManager(tmp_path, keep_last=3), 10)
    (path / name).write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(UserError, match="pickle|safetensors"):
        read_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_checkpoint_holds_tensors_and_json_only(tmp_path):
    path = _save(CheckpointManager(tmp_path, keep_last=3), 10)
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["format"] == "lmforge-trainer-state" and "python" in state["rng"]
    save_file({"x": torch.zeros(1)}, str(tmp_path / "probe.safetensors"))  # the format we rely on
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [COMPLETE, "config.json", "config.toml", "model.safetensors", "optimizer.safetensors",
         "rng.safetensors", "trainer_state.json"])


@pytest.fixture
def restore_matmul_precision():
    """prepare_for_training on a CUDA device sets a process-wide matmul precision; undo it."""
    before = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(before)


@pytest.mark.parametrize("setting, device, expected", [
    ("auto", "cpu", True), ("auto", "cuda", False), ("on", "cuda", True), ("off", "cpu", False),
])
def test_pretraining_resolves_the_fused_loss(setting, device, expected, restore_matmul_precision):
    """train.fused_loss picks the head loss the pre-training objective holds; the model itself is
    never changed (no attribute set on it)."""
    from lmforge.train.loop import prepare_for_training
    from lmforge.train.pretrain import loss_options

    cfg = load_config(preset="tiny", overrides=[f"train.fused_loss={setting}"])
    model = prepare_for_training(Transformer(cfg.model), cfg.train, torch.device(device))
    before = dict(vars(model))
    options = loss_options(model, cfg.train, torch.device(device))
    head_loss = options.get("head_loss")
    assert (head_loss is not None and head_loss.keywords == {"fused": True}) is expected
    assert vars(model) == before
    # The switch changes how the loss is computed, never its value.
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = Transformer(cfg.model)
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(model.loss(x[:, :-1], x[:, 1:], **options), plain.loss(x[:, :-1], x[:, 1:]), atol=1e-6)


@pytest.mark.parametrize("tf32, expected", [(True, "high"), (False, "highest")])
def test_tf32_switch_sets_the_matmul_precision_on_cuda_only(tf32, expected, restore_matmul_precision):
    from lmforge.train.loop import prepare_for_training

    cfg = load_config(preset="tiny", overrides=[f"train.tf32={str(tf32).lower()}"])
    torch.set_float32_matmul_precision("highest")
    prepare_for_training(Transformer(cfg.model), cfg.train, torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == "highest"  # CPU runs are left alone
    prepare_for_training(Transformer(cfg.model), cfg.train, torch.device("cuda"))
    assert torch.get_float32_matmul_precision() == expected  # "high" lets fp32 products use TF32


def test_sampling_runs_compiled_blocks_eagerly():
    """Sampling calls the blocks with a KV cache and a new shape per token; under train.compile
    each would be a recompilation. Inside run_compiled_code_eagerly nothing is compiled."""
    from torch._dynamo.testing import CompileCounter

    from lmforge.train.loop import run_compiled_code_eagerly

    torch._dynamo.reset()
    cfg = load_config(preset="tiny", overrides=["model.n_layers=2", "model.max_seq_len=32"])
    model = Transformer(cfg.model).eval()
    counter = CompileCounter()
    for block in model.layers.values():
        block.compile(backend=counter)
    idx = torch.randint(0, cfg.model.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(idx)  # a training-shaped call compiles the block frame
    compiled = counter.frame_count
    assert compiled >= 1
    with run_compiled_code_eagerly():
        generate(model, idx, 6, temperature=0)
    assert counter.frame_count == compiled
    torch._dynamo.reset()
