"""The foundation commands end to end in subprocesses: `init`, `model info`, `config show`, and the
one-line errors (exit code 2, no traceback) for bad input; checkpoints never unpickle."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge.checkpoint import load_model, save_model
from lmforge.config import load_config
from lmforge.engine import generate
from lmforge.errors import UserError
from lmforge.model import Transformer

TINY = ["--set", "model.n_layers=2", "--set", "model.vocab_size=512"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ckpt"
    r = run_cli("init", "--preset", "tiny", *TINY, "--set", "train.seed=7", "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def test_init_writes_a_loadable_seeded_checkpoint(ckpt):
    assert sorted(p.name for p in ckpt.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["format"] == "lmforge-checkpoint" and meta["version"] == 1
    assert meta["config"]["model"]["n_layers"] == 2 and meta["config"]["train"]["seed"] == 7
    model = lmforge.load_model(ckpt)
    assert not model.training
    idx = torch.randint(0, 512, (2, 9))
    assert model(idx).shape == (2, 9, 512)
    # Same seed, same weights: the initialisation is reproducible.
    torch.manual_seed(7)
    fresh = Transformer(load_config(preset="tiny", overrides=["model.n_layers=2", "model.vocab_size=512"]).model)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())


def test_model_info_from_preset_and_checkpoint(ckpt):
    r = run_cli("model", "info", "--checkpoint", ckpt, "--batch-size", "4", "--seq-len", "128")
    assert r.returncode == 0, r.stderr
    real = sum(p.numel() for p in lmforge.load_model(ckpt).parameters())
    assert f"{real:,}" in r.stdout
    for word in ("embedding", "attention", "mlp", "norms", "head", "FLOPs per token", "AdamW state",
                 "activations", "fp32", "bf16", "batch 4 x seq 128"):
        assert word in r.stdout
    r = run_cli("model", "info", "--preset", "llama-7b")
    assert r.returncode == 0 and "6,738,415,616" in r.stdout


@pytest.mark.parametrize("args, words", [
    (["init", "--preset", "huge", "--out", "x"], ["unknown preset", "huge"]),
    (["init", "--preset", "tiny", "--set", "model.n_layerz=3", "--out", "x"], ["model.n_layerz"]),
    (["init", "--preset", "tiny", "--set", "model.n_layers=two", "--out", "x"], ["model.n_layers", "int"]),
    (["init", "--preset", "tiny", "--set", "model.n_heads=3", "--out", "x"], ["model.n_heads=3", "model.d_model=128"]),
    (["model", "info", "--checkpoint", "no/such/dir"], ["not found", "no/such/dir"]),
    (["export", "hf", "--checkpoint", "no/such/dir", "--out", "x"], ["not found"]),
    (["import", "hf", "--from", "no/such/dir", "--out", "x"], ["not found"]),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, words):
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    assert_one_line_error(run_cli(*args), *words)
    assert not (tmp_path / "x").exists()


def test_tensors_not_matching_the_config_are_named(tmp_path, ckpt):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    meta = json.loads((ckpt / "config.json").read_text())
    meta["config"]["model"]["n_layers"] = 3
    (bad / "config.json").write_text(json.dumps(meta))
    r = run_cli("export", "hf", "--checkpoint", bad, "--out", tmp_path / "hf")
    assert_one_line_error(r, "layers.2.", "missing")
    meta["config"]["model"]["n_layers"] = 2
    meta["config"]["model"]["d_ff"] = 512
    (bad / "config.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"layers\.0\.mlp\.gate_proj\.weight.*shape \[384, 128\].*\[512, 128\]"):
        load_model(bad)


def test_existing_output_is_not_overwritten(ckpt):
    before = (ckpt / "model.safetensors").read_bytes()
    assert_one_line_error(run_cli("init", "--preset", "tiny", "--out", ckpt), "already exists")
    assert (ckpt / "model.safetensors").read_bytes() == before


class _Payload:
    """Unpickling this would create a file: proof that something unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_disguised_pickle_is_never_loaded(tmp_path, ckpt):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((ckpt / "config.json").read_text())
    sentinel = tmp_path / "pwned"
    torch.save({"embed_tokens.weight": _Payload(str(sentinel))}, evil / "model.safetensors")
    with pytest.raises(UserError, match="safetensors"):
        load_model(evil)
    assert_one_line_error(run_cli("export", "hf", "--checkpoint", evil, "--out", tmp_path / "hf"), "safetensors")
    assert not sentinel.exists()


def test_run_directory_loads_newest_complete_checkpoint(tmp_path):
    cfg = load_config(preset="tiny", overrides=["model.n_layers=1", "model.vocab_size=300"])
    run = tmp_path / "run"
    models = {}
    for step, complete in ((100, True), (200, True), (300, False)):
        torch.manual_seed(step)
        models[step] = Transformer(cfg.model)
        d = save_model(models[step], cfg, run / "checkpoints" / f"step_{step:08d}")
        (d / "trainer_state.json").write_text("{}")
        if complete:
            (d / "COMPLETE").write_text("")
    loaded = load_model(run)
    assert torch.equal(loaded.embed_tokens.weight, models[200].embed_tokens.weight)
    with pytest.raises(UserError, match="unfinished"):
        load_model(run / "checkpoints" / "step_00000300")
    for step in (100, 200):
        (run / "checkpoints" / f"step_{step:08d}" / "COMPLETE").unlink()
    with pytest.raises(UserError, match="no complete checkpoint"):
        load_model(run)


def test_bf16_checkpoint_round_trip(tmp_path):
    cfg = load_config(preset="tiny", overrides=["model.n_layers=1", "model.vocab_size=300"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(torch.bfloat16)
    save_model(model, cfg, tmp_path / "bf16")
    loaded = load_model(tmp_path / "bf16")
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    idx = torch.randint(0, 300, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(idx), model(idx))
    assert generate(loaded, idx, 4, temperature=0).shape == (1, 12)
