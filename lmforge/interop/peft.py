"""PEFT interop: a LoRA checkpoint's adapters as a Hugging Face `peft` adapter directory.

    lmforge export peft --checkpoint LORA_CKPT --out DIR    adapter_config.json + adapter_model.safetensors

`peft.PeftModel.from_pretrained(model, DIR)` loads it on top of `lmforge export hf` of the base.
Only the adapters are read: the base's weights are neither needed nor copied. Our adapter
tensors already have peft's layout (lora_A: r x in, lora_B: out x r, scale alpha / r), so export
is renaming: `layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight`; embeddings / head that trained in full go in as peft's `modules_to_save`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.atomic import atomic_directory, atomic_write_json
from lmforge.config import LoraConfig, RunConfig
from lmforge.errors import UserError

if TYPE_CHECKING:
    import torch

PEFT_PREFIX = "base_model.model."


def adapter_config(lora: LoraConfig, base_name: str, tied_embeddings: bool) -> dict[str, Any]:
    """peft's adapter_config.json for `lora`. `target_modules` is always written: without it peft
    falls back to its per-architecture default (q and v) and silently drops the other adapters."""
    from lmforge.finetune.lora import TARGET_MODULES

    modules_to_save = _modules_to_save(lora, tied_embeddings)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": [TARGET_MODULES[t].rpartition(".")[2] for t in lora.targets],
        "modules_to_save": modules_to_save or None,
        # A tied head trains with the embedding: peft must keep its copy of the head tied to it.
        "ensure_weight_tying": bool(modules_to_save) and tied_embeddings,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _modules_to_save(lora: LoraConfig, tied_embeddings: bool) -> list[str]:
    """The fully trained modules, in peft's terms (see lora._fully_trained_modules)."""
    modules = []
    if lora.train_embeddings or (lora.train_head and tied_embeddings):
        modules.append("embed_tokens")
    if lora.train_head and not tied_embeddings:
        modules.append("lm_head")
    return modules


def peft_name(name: str) -> str:
    """Our parameter name -> its key in peft's adapter_model.safetensors."""
    if name.endswith((".lora_A", ".lora_B")):
        name += ".weight"
    return PEFT_PREFIX + (name if name.startswith("lm_head.") else f"model.{name}")


def export_peft(checkpoint: str | os.PathLike, out: str | os.PathLike, base_name: str | None = None,
                overwrite: bool = False) -> Path:
    """Write a peft adapter directory for a LoRA checkpoint (or a run directory's newest one)."""
    from safetensors.torch import save_file

    from lmforge.checkpoint import load_state, read_config, resolve_checkpoint
    from lmforge.finetune.lora import LORA_META, LORA_WEIGHTS, is_lora_checkpoint, read_lora_meta
    from lmforge.interop.hf import hf_config

    directory = resolve_checkpoint(checkpoint)
    if not is_lora_checkpoint(directory):
        raise UserError(f"{directory} is not a LoRA checkpoint (it has no {LORA_META}); "
                        "export a full model with `lmforge export hf`")
    cfg: RunConfig = read_config(directory)
    hf_config(cfg.model)  # the clear error for an arch Hugging Face has no class for
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose a new directory or pass --force")
    state: dict[str, torch.Tensor] = load_state(directory / LORA_WEIGHTS)
    tensors = {peft_name(name): t.contiguous() for name, t in state.items()}
    base = base_name or str(read_lora_meta(directory).checkpoint)
    config = adapter_config(cfg.lora, base, cfg.model.tie_embeddings)
    if config["ensure_weight_tying"]:  # peft reads the tied head's copy from its own key
        tensors[peft_name("lm_head.weight")] = state["embed_tokens.weight"].clone()
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "adapter_config.json", config)
    return out


def export_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="LoRA checkpoint directory (or a run directory: its newest complete checkpoint)")
    parser.add_argument("--out", required=True, metavar="DIR", help="peft adapter directory to write")
    parser.add_argument("--base-name", metavar="NAME",
                        help="base_model_name_or_path to record, e.g. where `lmforge export hf` wrote "
                             "the base (default: the base checkpoint's path)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def export_command(args: argparse.Namespace) -> int:
    out = export_peft(args.checkpoint, args.out, base_name=args.base_name, overwrite=args.force)
    print(f"wrote {out} (load it with peft.PeftModel.from_pretrained on `lmforge export hf` of the base)")
    return 0
