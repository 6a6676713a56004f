"""The pre-training loop end to end on a tiny model and a tiny corpus made by the data stage."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import losses, make_shards, read_metrics, set_args, tiny_config
from train_fixtures import run_lmforge as _lmforge

from lmforge.train.pretrain import pretrain


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted run of 12 steps: the truth the interrupted runs must reproduce."""
    run = tmp_path_factory.mktemp("reference")
    result = pretrain(tiny_config(), shards, run)
    assert result.step == 12
    return run


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_samples_are_logged_at_intervals(shards, tmp_path, dtype):
    """train.sample_every writes a continuation of the prompt into the metrics; also under bf16
    autocast (the GPU default), where the KV cache must take bf16 keys and values."""
    cfg = tiny_config("train.max_steps=6", "train.sample_every=3", "train.sample_tokens=8",
                      f"train.dtype={dtype}")
    assert pretrain(cfg, shards, tmp_path).step == 6
    samples = [r for r in read_metrics(tmp_path) if "sample" in r]
    assert [r["step"] for r in samples] == [3, 6]
    assert all(r["sample"].startswith(cfg.train.sample_prompt) for r in samples)
    assert all(len(r["sample"]) > len(cfg.train.sample_prompt) for r in samples)


def test_a_run_logs_metrics_and_writes_loadable_checkpoints(reference):
    import lmforge

    records = read_metrics(reference)
    train = [r for r in records if "loss" in r and "event" not in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("tokens", "lr", "grad_norm", "tokens_per_s", "memory_gb"):
        assert key in train[0]
    assert train[-1]["tokens"] == 12 * 4 * 32
    evals = [r for r in records if "val_bpb" in r]
    assert [r["step"] for r in evals] == [5, 10, 12]
    assert all(0 < r["val_bpb"] < r["val_loss"] for r in evals)  # ~3 bytes per token here
    model = lmforge.load_model(reference)  # a run directory: its newest complete checkpoint
    assert model.cfg.d_model == 32
    names = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert names == ["step_00000005", "step_00000010", "step_00000012"]  # keep_last=3


def test_resume_after_sigterm_reproduces_the_uninterrupted_losses(shards, reference, tmp_path):
    first = pretrain(tiny_config("debug.inject=sigterm@6"), shards, tmp_path)
    assert first.stopped_by_signal and first.step == 6
    assert (tmp_path / "checkpoints" / "step_00000006" / "COMPLETE").is_file()
    from lmforge.train.checkpoint import resolve_resume

    second = pretrain(tiny_config(), shards, tmp_path, resume_from=resolve_resume(tmp_path, True))
    assert second.step == 12
    assert losses(tmp_path) == losses(reference)  # exactly, step by step
    a = load_file(str(reference / "checkpoints" / "step_00000012" / "model.safetensors"))
    b = load_file(str(tmp_path / "checkpoints" / "step_00000012" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigkill_mid_step_and_mid_checkpoint_resume_from_the_last_complete_one(shards, reference, tmp_path):
    out = str(tmp_path / "run")
    base = ["pretrain", "--data", str(shards), "--out", out]
    # Killed while writing the checkpoint of step 10: only step 5 is complete.
    killed = _lmforge(*base, *set_args("debug.inject=sigkill_in_checkpoint@10"), check=False)
    assert killed.returncode == -9
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step_00000005" / "COMPLETE").is_file()
    assert not (ckpts / "step_00000010").exists()
    assert any(p.name.startswith(".step_00000010") for p in ckpts.iterdir())  # the torn write
    # Resumed from step 5, then killed again in the middle of step 8.
    killed = _lmforge(*base, "--resume", *set_args("debug.inject=sigkill@8"), check=False)
    assert killed.returncode == -9
    _lmforge(*base, "--resume", *set_args())
    assert losses(tmp_path / "run") == losses(reference)
    assert not any(p.name.startswith(".") for p in ckpts.iterdir())  # torn writes cleaned up


def test_injected_spike_and_nan_are_rolled_back_and_the_run_finishes(shards, tmp_path):
    cfg = tiny_config("debug.inject=spike@12,nan@17", "train.max_steps=20", "guard.window=10",
                      "guard.lr_factor=0.5", "guard.lr_cooldown_steps=3")
    result = pretrain(cfg, shards, tmp_path)
    assert result.step == 20
    events = [r for r in read_metrics(tmp_path) if r.get("event") == "rollback"]
    assert [(e["step"], e["reason"], e["to_step"]) for e in events] == [(12, "spike", 10), (17, "nan_loss", 15)]
    weights = load_file(str(tmp_path / "checkpoints" / "step_00000020" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert all(math.isfinite(v) and v < 10 for v in losses(tmp_path).values())
    state = json.loads((tmp_path / "checkpoints" / "step_00000020" / "trainer_state.json").read_text())
    assert state["guard"]["rollbacks"] == 2 and state["guard"]["skip"] == {"12": 1, "17": 1}


def test_out_of_rollbacks_stops_with_a_clear_message(shards, tmp_path):
    proc = _lmforge("pretrain", "--data", str(shards), "--out", str(tmp_path),
                    *set_args("debug.inject=nan@3", "guard.max_rollbacks=0"), check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "max_rollbacks=0" in proc.stderr.strip().splitlines()[-1]


def test_gradient_accumulation_4x2_equals_1x8(shards, tmp_path):
    steps = ["train.max_steps=3", "train.eval_every=100", "train.checkpoint_every=100"]
    pretrain(tiny_config(*steps, "train.batch_size=2", "train.batch_tokens=256"), shards, tmp_path / "a")
    pretrain(tiny_config(*steps, "train.batch_size=8"), shards, tmp_path / "b")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys() == {1, 2, 3}
    assert all(la[s] == pytest.approx(lb[s], rel=1e-5) for s in la)
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step_00000003" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step_00000003" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_tiny_model_overfits_a_tiny_batch(optimizer):
    from lmforge.model import Transformer
    from lmforge.train.optim import build_optimizer, set_learning_rate

    cfg = tiny_config(f"train.optimizer={optimizer}", "train.weight_decay=0")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    set_learning_rate(opt, 1.0)
    batch = torch.randint(0, 300, (2, 17))
    for _ in range(150):
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05  # from ~5.7 = ln(300): it memorised the batch


def test_cli_errors_are_one_line(shards, tmp_path):
    for args, needle in (
        (["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], "not found"),
        (["--data", str(shards), "--out", str(tmp_path / "r"), "--resume", str(tmp_path / "missing")], "not found"),
        (["--data", str(shards), "--out", str(tmp_path / "r"), "--set", "train.batch_tokens=100"], "batch_tokens"),
    ):
        proc = _lmforge("pretrain", *args, check=False)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


def test_sample_streams_a_continuation(reference):
    proc = _lmforge("sample", "--checkpoint", str(reference), "--prompt", "The cat",
                    "--max-new-tokens", "10", "--seed", "1")
    assert proc.stdout.startswith("The cat") and len(proc.stdout) > len("The cat\n")
    again = _lmforge("sample", "--checkpoint", str(reference), "--prompt", "The cat",
                     "--max-new-tokens", "10", "--seed", "1")
    assert again.stdout == proc.stdout  # seeded


def test_activation_checkpointing_changes_memory_not_math(shards, reference, tmp_path):
    # Steps 1-3 are inside the warmup, so their learning rates do not depend on max_steps.
    pretrain(tiny_config("train.activation_checkpointing=true", "train.max_steps=3"), shards, tmp_path)
    ours, ref = losses(tmp_path), losses(reference)
    assert all(ours[s] == pytest.approx(ref[s], rel=1e-6) for s in (1, 2, 3))
