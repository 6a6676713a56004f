"""The one config mechanism: layers (preset -> TOML -> --set), validation messages, TOML round trip."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.cli import main
from lmforge.config import PRESETS, RunConfig, load_config, read_toml
from lmforge.errors import ConfigError


def test_layers_override_in_order(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nn_layers = 3\nd_model = 256\n[train]\nlr = 0.01\n")
    cfg = load_config(preset="tiny", config_file=toml, overrides=["model.n_layers=5", "train.schedule=wsd"])
    assert cfg.model.vocab_size == PRESETS["tiny"]["model"]["vocab_size"]  # from the preset
    assert cfg.model.d_model == 256 and cfg.train.lr == 0.01  # from the file
    assert cfg.model.n_layers == 5 and cfg.train.schedule == "wsd"  # --set wins
    assert load_config(overrides=["train.lr=1"]).train.lr == 1.0  # int accepted for a float


@pytest.mark.parametrize("overrides, message", [
    (["model.n_heads=6", "model.d_model=100"], "model.n_heads=6 must divide model.d_model=100"),
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 must divide model.n_heads=4"),
    (["model.d_model=120", "model.n_heads=8"], "even head size"),
    (["model.arch=bert"], "model.arch='bert' must be one of: llama, gpt2"),
    (["model.n_layers=0"], "model.n_layers=0 must be > 0"),
    (["model.n_layerz=3"], "unknown config key 'model.n_layerz'"),
    (["modle.n_layers=3"], "unknown config key 'modle'"),
    (["model.n_layers=two"], "model.n_layers='two' is not a valid int"),
    (["model.qk_norm=maybe"], "model.qk_norm='maybe' is not a valid bool"),
    (["model.rope_theta=abc"], "model.rope_theta='abc' is not a valid float"),
    (["model=3"], "is a section"),
    (["model.n_layers"], "expected section.field=value"),
    (["train.seq_len=1024"], "train.seq_len=1024 exceeds model.max_seq_len=256"),
    (["train.fused_loss=yes"], "train.fused_loss='yes' must be one of: auto, on, off"),
])
def test_validation_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'huge'; choose one of: tiny, small"):
        load_config(preset="huge")


def test_toml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(config_file=tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nn_layers = 3\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(config_file=bad)
    bad.write_text("[model]\nn_layers = 'three'\n")
    with pytest.raises(ConfigError, match="n_layers='three' is not a valid int"):
        load_config(config_file=bad)


SHOW = ["--set", "model.qk_norm=true", "--set", "tokenizer.special_tokens=<|a|>,<|b|>"]


def _round_trip(tmp_path, preset: str, shown: str) -> None:
    file = tmp_path / "shown.toml"
    file.write_text(shown)
    from_file = load_config(config_file=file)
    direct = load_config(preset=preset, overrides=["model.qk_norm=true", "tokenizer.special_tokens=<|a|>,<|b|>"])
    assert from_file == direct
    assert read_toml(file)["model"]["qk_norm"] is True
    assert from_file != RunConfig().validate()


@pytest.mark.parametrize("preset", list(PRESETS))
def test_config_show_output_round_trips_through_a_toml_file(tmp_path, capsys, preset):
    assert main(["config", "show", "--preset", preset, *SHOW]) == 0
    _round_trip(tmp_path, preset, capsys.readouterr().out)


def test_config_show_in_a_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "lmforge", "config", "show", "--preset", "small", *SHOW],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    _round_trip(tmp_path, "small", r.stdout)
    r = subprocess.run([sys.executable, "-m", "lmforge", "config", "show", "--set", "model.d_model=100",
                        "--set", "model.n_heads=6"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "error: model.n_heads=6 must divide model.d_model=100"
