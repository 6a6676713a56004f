"""Model checkpoint directories: save and load, safetensors only (nothing is ever unpickled).

    CKPT_DIR/model.safetensors   weights, Hugging Face Llama names without the "model." prefix
    CKPT_DIR/config.json         {"format": "lmforge-checkpoint", "version": 1, "config": RunConfig}
    CKPT_DIR/tokenizer/          optional: the tokenizer the model was trained with

A LoRA checkpoint holds lora.safetensors + lora.json (adapters and its base's path and hash)
instead of model.safetensors; `load_model` returns its base with the adapters merged in.

A training checkpoint (under RUN_DIR/checkpoints/) holds the same files plus optimizer and trainer
state, and a `COMPLETE` marker written last; one without the marker is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmforge.atomic import atomic_directory, atomic_write_json
from lmforge.config import RunConfig, config_from_dict
from lmforge.errors import UserError

if TYPE_CHECKING:  # torch is imported where weights are touched: `model info` does not need it
    import torch

    from lmforge.model import Transformer

FORMAT = "lmforge-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
COMPLETE_MARKER = "COMPLETE"
# Marks a reward model's checkpoint (lmforge/align/reward.py): a scalar scorer, never a policy.
REWARD_MODEL_FILE = "reward_model.json"
# Files only a training checkpoint has; with them, a missing COMPLETE marker means "unfinished".
TRAINING_FILES = ("optimizer.safetensors", "trainer_state.json")
# RUN_DIR/checkpoints/selected.json: the checkpoint a run chose as its result by a held-out score
# (TrainLoop, an objective's `select_by`), {"step", "metric", "value"}; a run directory loads it.
SELECTED_FILE = "selected.json"


# --------------------------------------------------------------------------------------------
# Saving


def write_model_files(model: Transformer | dict[str, torch.Tensor], cfg: RunConfig,
                      directory: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None) -> None:
    """Write weights, config and tokenizer into an existing directory (the trainer calls this
    inside its own atomic training-checkpoint directory, with the full state dict it gathered)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors = model if isinstance(model, dict) else model.state_dict()
    state = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    write_config_files(cfg, directory, tokenizer_dir)


def write_config_files(cfg: RunConfig, directory: str | os.PathLike,
                       tokenizer_dir: str | os.PathLike | None = None) -> None:
    """config.json and the tokenizer copy: what every checkpoint has besides its weights
    (a LoRA checkpoint writes adapters instead of model.safetensors, lmforge/finetune/lora.py)."""
    directory = Path(directory)
    atomic_write_json(directory / CONFIG_FILE, {"format": FORMAT, "version": VERSION, "config": cfg.to_dict()})
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, directory / TOKENIZER_DIR)


def save_model(model: Transformer, cfg: RunConfig, directory: str | os.PathLike,
               tokenizer_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write a model checkpoint directory atomically: it appears complete or not at all."""
    directory = Path(directory)
    if directory.exists() and not overwrite:
        raise UserError(f"{directory} already exists; choose a new directory or pass --force")
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise UserError(f"tokenizer directory not found: {tokenizer_dir}")
    with atomic_directory(directory, overwrite=overwrite) as tmp:
        write_model_files(model, cfg, tmp, tokenizer_dir)
    return directory


# --------------------------------------------------------------------------------------------
# Finding and loading


# The stages of an `lmforge run` lifecycle that leave a model in a run directory of their own
# under RUN/, latest first: `--checkpoint RUN` means the final model of the run.
LIFECYCLE_MODEL_DIRS = ("align", "sft")
LIFECYCLE_RECORD = "stages.json"  # only a run of `lmforge run` has it


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or a run directory's newest complete checkpoint (the one its
    checkpoints/selected.json names, for a run that chose its best by a held-out score); for a run
    of `lmforge run`, its final model: aligned, else fine-tuned, else pre-trained."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint directory not found: {path}")
    final = final_stage_dir(path)
    if final is not None:
        return resolve_checkpoint(final)
    runs_checkpoints = path / "checkpoints"
    if not (path / CONFIG_FILE).exists() and runs_checkpoints.is_dir():
        result = run_result(runs_checkpoints)
        if result is None:
            raise UserError(f"no complete checkpoint under {runs_checkpoints} (none has a {COMPLETE_MARKER} marker)")
        return result
    if any((path / f).exists() for f in TRAINING_FILES) and not (path / COMPLETE_MARKER).is_file():
        raise UserError(f"{path} is an unfinished training checkpoint (no {COMPLETE_MARKER} marker); not loading it")
    return path


def read_selected(checkpoints_dir: Path) -> dict[str, Any] | None:
    """The record of RUN_DIR/checkpoints/selected.json ({"step", "metric", "value"}), or None."""
    try:
        record = json.loads((Path(checkpoints_dir) / SELECTED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def selected_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint selected.json names (a run that chose its best), else None."""
    record = read_selected(checkpoints_dir)
    if record is None:
        return None
    path = Path(checkpoints_dir) / f"step_{record['step']:08d}"
    return path if (path / COMPLETE_MARKER).is_file() else None


def run_result(checkpoints_dir: str | os.PathLike) -> Path | None:
    """The model a run's checkpoints/ directory stands for: the checkpoint selected.json names (a
    run that chose its best by a held-out score), else the newest complete one; None if none is.
    The hidden temporaries of atomic writes never count: a write killed after its COMPLETE marker
    but before its rename leaves one, and the next resume deletes it."""
    checkpoints_dir = Path(checkpoints_dir)
    if not checkpoints_dir.is_dir():
        return None
    selected = selected_checkpoint(checkpoints_dir)
    if selected is not None:
        return selected
    complete = [d for d in checkpoints_dir.iterdir()
                if not d.name.startswith(".") and d.is_dir() and (d / COMPLETE_MARKER).is_file()]
    return max(complete, key=_step_of, default=None)


def final_stage_dir(run_dir: Path) -> Path | None:
    """The run directory of the last stage of an `lmforge run` lifecycle that left a complete
    checkpoint (RUN/align, else RUN/sft); None for other directories and for a run with neither."""
    if not (run_dir / LIFECYCLE_RECORD).is_file():
        return None
    for name in LIFECYCLE_MODEL_DIRS:
        checkpoints = run_dir / name / "checkpoints"
        if checkpoints.is_dir() and any((d / COMPLETE_MARKER).is_file() for d in checkpoints.iterdir()):
            return run_dir / name
    return None


def _step_of(directory: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", directory.name)
    return (int(digits[-1]) if digits else -1, directory.name)


def read_config(path: str | os.PathLike) -> RunConfig:
    """The RunConfig stored with a checkpoint (or a run directory's newest complete one)."""
    directory = resolve_checkpoint(path)
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise UserError(f"{directory} is not an lmforge checkpoint: {CONFIG_FILE} is missing")
    try:
        meta: Any = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{file}: not an lmforge checkpoint config (expected \"format\": \"{FORMAT}\")")
    if meta.get("version") != VERSION:
        raise UserError(f"{file}: checkpoint version {meta.get('version')!r} is not supported (this lmforge reads {VERSION})")
    return config_from_dict(meta.get("config", {}), source=str(file))


def load_state(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; anything else (a pickle, a truncated file) is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(file)
    if not file.is_file():
        raise UserError(f"weights file missing: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{file}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def check_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fail with one line naming the first tensor whose name or shape the model does not expect."""
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise UserError(f"{source}: tensor {name!r} is missing (its config expects shape {list(shape)})")
        if tuple(state[name].shape) != shape:
            raise UserError(f"{source}: tensor {name!r} has shape {list(state[name].shape)}, "
                            f"but its config expects {list(shape)}")
    for name in state:
        if name not in expected:
            raise UserError(f"{source}: unexpected tensor {name!r} (not part of the model its config describes)")


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Fail with one line naming the first tensor holding NaN or infinity: such weights (a
    diverged run, a damaged file) give NaN logits, which no sampler or export can use."""
    import torch

    for name, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise UserError(f"{source}: tensor {name!r} holds {bad:,} NaN or infinite values; "
                            "the weights are damaged or training diverged (use an earlier checkpoint)")


def build_model(cfg: RunConfig, state: dict[str, torch.Tensor], source: str,
                device: torch.device | str = "cpu") -> Transformer:
    """A model for `cfg` holding the tensors of `state` (checked first), in eval mode."""
    import torch

    from lmforge.model import Transformer

    with torch.device("meta"):  # no memory and no random init for weights about to be replaced
        model = Transformer(cfg.model)
    check_state(model, state, source)
    check_finite(state, source)
    model.load_state_dict(state, assign=True)
    model.init_buffers(device="cpu")
    return model.to(device).eval()


def refuse_reward_model(directory: Path) -> None:
    """A reward model passed where a language model is wanted: one clear line."""
    if (directory / REWARD_MODEL_FILE).is_file():
        raise UserError(f"{directory} is a reward model (it scores answers, it does not generate "
                        "them); pass a policy checkpoint here, and the reward model to --reward")


def load_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> Transformer:
    """Load a checkpoint directory, or a run directory's newest complete checkpoint, in eval mode.
    A LoRA checkpoint gives its base with the adapters merged in (lmforge/finetune/lora.py)."""
    from lmforge.finetune.lora import is_lora_checkpoint, load_lora_model

    directory = resolve_checkpoint(path)
    refuse_reward_model(directory)
    if is_lora_checkpoint(directory):
        return load_lora_model(directory, device)
    cfg = read_config(directory)
    state = load_state(directory / WEIGHTS_FILE)
    return build_model(cfg, state, str(directory / WEIGHTS_FILE), device)
