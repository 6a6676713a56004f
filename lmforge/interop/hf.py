"""Hugging Face interop: our checkpoints <-> `LlamaForCausalLM` / `Qwen3ForCausalLM` directories.

Our parameter names are Llama's without the "model." prefix and the math is identical (RoPE in the
"rotate half" layout, Qwen3 QK-norm), so conversion is renaming tensors and translating config
fields. Neither direction needs `transformers` installed or any network access.

    lmforge export hf --checkpoint CKPT --out HF_DIR   config.json, model.safetensors,
                                                       generation_config.json (+ tokenizer files)
    lmforge import hf --from HF_DIR --out CKPT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.atomic import atomic_directory, atomic_write_json
from lmforge.config import ModelConfig, RunConfig
from lmforge.errors import UserError
from lmforge.outputs import add_force_arg, check_output

if TYPE_CHECKING:  # torch is imported only by the commands that load weights
    import torch

# ModelConfig field -> Hugging Face config key, shared by Llama and Qwen3.
FIELD_TO_HF = {
    "vocab_size": "vocab_size",
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "max_seq_len": "max_position_embeddings",
    "norm_eps": "rms_norm_eps",
    "tie_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}
SUPPORTED = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# --------------------------------------------------------------------------------------------
# Config translation


def hf_config(cfg: ModelConfig, dtype: str = "float32",
              special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """The Hugging Face config.json for `cfg`: Llama, or Qwen3 when QK-norm is on."""
    if cfg.arch != "llama":
        raise UserError(f"model.arch={cfg.arch!r} has no Hugging Face Llama/Qwen3 equivalent; "
                        "only arch 'llama' checkpoints can be exported")
    model_type = "qwen3" if cfg.qk_norm else "llama"
    out: dict[str, Any] = {"architectures": [SUPPORTED[model_type]], "model_type": model_type}
    out.update({hf: getattr(cfg, ours) for ours, hf in FIELD_TO_HF.items()})
    out.update(
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        intermediate_size=cfg.ffn_dim,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        # transformers >= 5 reads rope_parameters, older versions rope_theta; write both.
        rope_theta=cfg.rope_theta,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_scaling=None,
        torch_dtype=dtype,
        use_cache=True,
    )
    if model_type == "llama":
        out.update(mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if special_ids and key in special_ids:
            out[key] = special_ids[key]
    return out


def model_config_from_hf(hf: dict[str, Any], source: str) -> ModelConfig:
    """Translate a Llama/Qwen3 config.json into a ModelConfig, refusing what we cannot represent."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        arch = hf.get("architectures") or model_type
        raise UserError(f"{source}: unsupported architecture {arch!r}; lmforge imports "
                        f"{', '.join(SUPPORTED.values())}")
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in hf]
    if missing:
        raise UserError(f"{source}: config.json lacks {', '.join(missing)}")
    unsupported = {
        "attention_bias": hf.get("attention_bias", False),
        "mlp_bias": hf.get("mlp_bias", False),
        "rope_scaling": _rope_scaling(hf),
        "use_sliding_window": hf.get("use_sliding_window", False),
    }
    for key, value in unsupported.items():
        if value:
            raise UserError(f"{source}: {key}={value!r} is not supported by the lmforge model")
    if hf.get("hidden_act", "silu") != "silu":
        raise UserError(f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only silu)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise UserError(f"{source}: head_dim={head_dim} x num_attention_heads={heads} != "
                        f"hidden_size={hf['hidden_size']}; lmforge needs head_dim = hidden_size / heads")
    rope = hf.get("rope_parameters") or {}
    cfg = ModelConfig(
        arch="llama",
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),  # False: both classes' default
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    cfg.validate()
    return cfg


def _rope_scaling(hf: dict[str, Any]) -> Any:
    """A RoPE variant other than the default one (e.g. Llama 3.1's "llama3" scaling), or None."""
    for key in ("rope_scaling", "rope_parameters"):
        value = hf.get(key)
        if isinstance(value, dict) and value.get("rope_type", value.get("type", "default")) != "default":
            return value.get("rope_type", value.get("type"))
    return None


# --------------------------------------------------------------------------------------------
# Export


def export_hf(checkpoint: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a Hugging Face model directory for a checkpoint (and its tokenizer, if it has one)."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import TOKENIZER_DIR, load_model, read_config, resolve_checkpoint

    directory = resolve_checkpoint(checkpoint)
    cfg = read_config(directory)
    if cfg.model.arch != "llama":
        hf_config(cfg.model)  # raises the clear "cannot export gpt2" error
    model = load_model(directory)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose a new directory or pass --force")
    tokenizer_dir = directory / TOKENIZER_DIR
    special_ids = _special_ids(tokenizer_dir) if tokenizer_dir.is_dir() else None
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        state = {_to_hf_name(name): t.contiguous() for name, t in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_config(cfg.model, dtype, special_ids))
        generation = {"do_sample": False, **(special_ids or {})}
        atomic_write_json(tmp / "generation_config.json", generation)
        if tokenizer_dir.is_dir():
            _export_tokenizer(tokenizer_dir, tmp)
    return out


def _to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else f"model.{name}"


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """bos/eos/pad ids from our tokenizer: <|endoftext|> ends (and so starts) documents."""
    from lmforge.tokenizer import load_tokenizer

    specials = load_tokenizer(tokenizer_dir).special_tokens
    ids: dict[str, int] = {}
    if "<|endoftext|>" in specials:
        ids["bos_token_id"] = ids["eos_token_id"] = specials["<|endoftext|>"]
    if "<|pad|>" in specials:
        ids["pad_token_id"] = specials["<|pad|>"]
    return ids


def _export_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    from lmforge.tokenizer import export_hf as export_tokenizer

    export_tokenizer(tokenizer_dir, out)


# --------------------------------------------------------------------------------------------
# Import


def import_hf(source: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert a local Llama/Qwen3 directory (config.json + safetensors) into an lmforge checkpoint."""
    source = Path(source)
    if not source.is_dir():
        raise UserError(f"Hugging Face model directory not found: {source}")
    config_file = source / "config.json"
    if not config_file.is_file():
        raise UserError(f"{source} has no config.json; expected a Hugging Face model directory")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{config_file}: not valid JSON ({e})") from None
    cfg = RunConfig(model=model_config_from_hf(hf, str(config_file)))
    from lmforge.checkpoint import build_model, load_state, save_model

    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(source):
        for name, tensor in load_state(file).items():
            if name.startswith("model."):
                state[name.removeprefix("model.")] = tensor
            elif name.startswith("lm_head.") and not cfg.model.tie_embeddings:
                state[name] = tensor
            elif not name.startswith("lm_head."):
                raise UserError(f"{file}: unexpected tensor {name!r}")
    model = build_model(cfg, state, str(source))
    tokenizer = _import_tokenizer(source, cfg)
    if tokenizer is None:
        return save_model(model, cfg.validate(), out, overwrite=overwrite)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save(tmp)
        cfg.tokenizer.vocab_size = tokenizer.vocab_size
        cfg.tokenizer.pattern = tokenizer.pattern
        cfg.tokenizer.special_tokens = list(tokenizer.special_tokens)
        return save_model(model, cfg.validate(), out, tokenizer_dir=tmp, overwrite=overwrite)


def _import_tokenizer(source: Path, cfg: RunConfig):
    """The source's tokenizer as an lmforge one, so `sample` works on the import; None (with a
    note) when there is none or lmforge cannot represent it."""
    from lmforge.tokenizer.export import tokenizer_from_hf

    if not (source / "tokenizer.json").is_file():
        print(f"note: {source} has no tokenizer.json; the import has no tokenizer (sample needs one)",
              file=sys.stderr)
        return None
    tok = tokenizer_from_hf(source)
    if tok is None or "<|endoftext|>" not in tok.special_tokens or tok.vocab_size > cfg.model.vocab_size:
        print(f"note: {source}/tokenizer.json is not a byte-level BPE tokenizer lmforge can read "
              "(as `export hf` writes); the import has no tokenizer (sample needs one)", file=sys.stderr)
        return None
    return tok


def _weight_files(source: Path) -> list[Path]:
    index = source / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [source / f for f in sorted(set(weight_map.values()))]
    if (source / "model.safetensors").is_file():
        return [source / "model.safetensors"]
    if any(source.glob("*.bin")) or any(source.glob("*.pt")):
        raise UserError(f"{source} holds pickle weights (*.bin/*.pt); lmforge reads safetensors only "
                        "(convert them with transformers' save_pretrained(safe_serialization=True))")
    raise UserError(f"{source} has no model.safetensors")


# --------------------------------------------------------------------------------------------
# CLI


def export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="checkpoint directory (or a run directory: its newest complete checkpoint)")
    parser.add_argument("--out", required=True, metavar="DIR", help="Hugging Face model directory to write")
    add_force_arg(parser)


def export_command(args: argparse.Namespace) -> int:
    check_output(args.out, args.force)  # before loading the model
    out = export_hf(args.checkpoint, args.out, overwrite=True)
    print(f"wrote {out} (load it with transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def import_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, metavar="DIR",
                        help="local Hugging Face Llama/Qwen3 model directory (config.json + safetensors)")
    parser.add_argument("--out", required=True, metavar="DIR", help="lmforge checkpoint directory to write")
    add_force_arg(parser)


def import_command(args: argparse.Namespace) -> int:
    check_output(args.out, args.force)
    out = import_hf(args.source, args.out, overwrite=True)
    print(f"wrote {out}")
    return 0
