"""Training checkpoints: everything needed to continue a run exactly, written atomically.

    RUN_DIR/checkpoints/step_00000100/
        model.safetensors, config.json   the model checkpoint (lmforge/checkpoint.py), loadable alone
        config.toml                      the resolved run config, for people
        optimizer.safetensors            optimizer state keyed "state/<param name>/<key>"
        shards/                          train.checkpoint_format="sharded": instead of
                                         optimizer.safetensors, model and optimizer slices written
                                         by every rank with DCP (lmforge/distributed/checkpoint.py);
                                         model.safetensors is then rank 0's consolidation of them
        rng.safetensors                  torch CPU/CUDA generator states as uint8 tensors
        trainer_state.json               step, tokens, schedule, loader, guard, faults, numpy/python RNG
        tokenizer/                       copy of SHARDS_DIR/tokenizer
        COMPLETE                         written last; a directory without it is never loaded

The directory is built under a temporary name and renamed into place (lmforge.atomic), so a crash
at any moment leaves either the previous checkpoints or the new one complete (with shards, every
rank writes into rank 0's temporary directory before rank 0 adds COMPLETE and renames it).
Nothing here is ever unpickled: a checkpoint holding a pickle file, or a .safetensors file that is
not one, is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.atomic import atomic_directory
from lmforge.checkpoint import selected_checkpoint, write_model_files
from lmforge.config import RunConfig
from lmforge.errors import UserError

COMPLETE = "COMPLETE"
SHARDS_DIR = "shards"
TRAINER_STATE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# A LoRA run's checkpoints hold these instead of model.safetensors (lmforge/finetune/lora.py).
_LORA_META, _LORA_WEIGHTS = "lora.json", "lora.safetensors"

WeightsWriter = Callable[[dict[str, torch.Tensor], RunConfig, Path, "Path | None"], None]


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


@dataclass
class TrainingCheckpoint:
    """What `read_checkpoint` returns: tensors and JSON, nothing else.

    A sharded checkpoint leaves `model` and `optimizer` empty: each rank loads its own slices from
    `shards` into the live (parallelized) model with lmforge.distributed.checkpoint.load_sharded.
    """

    path: Path
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # {"state": {name: {key: tensor}}, "param_groups": [...]}
    trainer: dict[str, Any]
    rng_tensors: dict[str, torch.Tensor]
    shards: Path | None = None
    # True for a LoRA run's checkpoint: `model` holds the trained tensors only (lora.safetensors);
    # the frozen base is the one the stage loaded.
    trained_only: bool = False

    @property
    def step(self) -> int:
        return int(self.trainer["step"])


# ---------------------------------------------------------------------------------------------
# RNG states as tensors and JSON.


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss = random.getstate()
    extra = {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(internal), "gauss": gauss},
    }
    return tensors, extra


def restore_rng(tensors: dict[str, torch.Tensor], extra: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    n = extra["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = extra["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> flat safetensors.


def _flatten_optimizer(named: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {
        f"state/{name}/{key}": value.detach().cpu().contiguous()
        for name, per_param in named["state"].items()
        for key, value in per_param.items()
    }
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()
         if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}
        for g in named["param_groups"]
    ]
    return tensors, {"format": "lmforge-optimizer", "param_groups": json.dumps(groups)}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    state: dict[str, dict[str, torch.Tensor]] = {}
    for flat, value in tensors.items():
        _, rest = flat.split("/", 1)
        name, key = rest.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": json.loads(metadata.get("param_groups", "[]"))}


# ---------------------------------------------------------------------------------------------
# Writing and reading one checkpoint directory.


def write_checkpoint(
    directory: Path,
    *,
    cfg: RunConfig,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    tokenizer_dir: Path | None,
    die_midway: bool = False,
    write_weights: WeightsWriter = write_model_files,
) -> None:
    """Fill `directory` (a temporary one) with a complete training checkpoint, COMPLETE last.

    `optimizer_state` is None where the optimizer's state is in `directory/shards` already.
    `write_weights(model_state, cfg, directory, tokenizer_dir)` writes the model checkpoint part:
    model.safetensors + config by default, a LoRA run's adapters + base reference instead.
    """
    has_tokenizer = tokenizer_dir is not None and tokenizer_dir.is_dir()
    write_weights(model_state, cfg, directory, tokenizer_dir if has_tokenizer else None)
    (directory / "config.toml").write_text(cfg.to_toml(), encoding="utf-8")
    if optimizer_state is not None:
        tensors, metadata = _flatten_optimizer(optimizer_state)
        save_file(tensors, str(directory / "optimizer.safetensors"), metadata=metadata)
    if die_midway:  # debug.inject sigkill_in_checkpoint: weights written, the rest not
        os.kill(os.getpid(), signal.SIGKILL)
    rng_tensors, rng_extra = capture_rng()
    save_file({k: v.contiguous() for k, v in rng_tensors.items()}, str(directory / "rng.safetensors"))
    state = dict(trainer_state, format="lmforge-trainer-state", version=1, rng=rng_extra)
    (directory / TRAINER_STATE).write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    (directory / COMPLETE).write_text("ok\n", encoding="utf-8")


def read_checkpoint(path: Path) -> TrainingCheckpoint:
    """Read a complete training checkpoint; any other directory is a clear UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    if not is_complete(path):
        raise UserError(f"checkpoint {path} is incomplete (no {COMPLETE} marker); it was being written when the run stopped")
    for f in path.rglob("*"):
        if f.suffix in _PICKLE_SUFFIXES:
            raise UserError(f"checkpoint {path} holds a pickle file {f.name}; lmforge never unpickles, refusing it")
    shards = path / SHARDS_DIR
    if shards.is_dir():
        # Weights and optimizer state stay on disk until each rank loads its slices.
        try:
            rng_tensors = load_file(str(path / "rng.safetensors"))
            trainer = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"checkpoint {path} is not readable as safetensors + JSON ({e}); refusing it") from None
        if trainer.get("format") != "lmforge-trainer-state":
            raise UserError(f"checkpoint {path} is not an lmforge training checkpoint")
        return TrainingCheckpoint(path, {}, {}, trainer, rng_tensors, shards=shards)
    trained_only = (path / _LORA_META).is_file()
    try:
        model = load_file(str(path / (_LORA_WEIGHTS if trained_only else "model.safetensors")))
        optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
        rng_tensors = load_file(str(path / "rng.safetensors"))
        from safetensors import safe_open

        with safe_open(str(path / "optimizer.safetensors"), framework="pt") as f:
            metadata = f.metadata() or {}
        trainer = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint {path} is not readable as safetensors + JSON ({e}); refusing it") from None
    if metadata.get("format") != "lmforge-optimizer" or trainer.get("format") != "lmforge-trainer-state":
        raise UserError(f"checkpoint {path} is not an lmforge training checkpoint")
    return TrainingCheckpoint(path, model, _unflatten_optimizer(optimizer_tensors, metadata), trainer, rng_tensors,
                              trained_only=trained_only)


# ---------------------------------------------------------------------------------------------
# The checkpoints of one run.


class CheckpointManager:
    """RUN_DIR/checkpoints: save atomically, find the newest complete one, keep the last K, the best
    by validation loss and the one selected.json names."""

    def __init__(self, run_dir: Path, keep_last: int):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and is_complete(p):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.complete()
        return found[-1][1] if found else None

    def remove_partial(self) -> None:
        """Delete temporary directories left by a write that was killed."""
        if self.root.is_dir():
            for p in self.root.glob(".step_*.tmp"):
                shutil.rmtree(p, ignore_errors=True)

    def save(self, step: int, die_midway: bool = False, **contents: Any) -> Path:
        final = self.root / checkpoint_name(step)
        with atomic_directory(final, overwrite=True) as tmp:
            write_checkpoint(tmp, die_midway=die_midway, **contents)
        self.prune()
        return final

    def save_sharded(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     die_midway: bool = False, **contents: Any) -> Path:
        """Collective: every rank writes its shards, then rank 0 the rest (`write_checkpoint`).

        Rank 0 builds the atomic directory and names it to the others; the weights in its
        model.safetensors are joined from the shards just written, so no rank gathers them in
        memory from the others and load_model / sample / export work on this checkpoint as on any.
        """
        from lmforge.distributed.checkpoint import (
            consolidated_weights,
            is_multi_process,
            write_shards,
        )

        final = self.root / checkpoint_name(step)
        multi = is_multi_process()
        main = not multi or dist.get_rank() == 0
        with (atomic_directory(final, overwrite=True) if main else contextlib.nullcontext()) as tmp:
            box = [str(tmp) if main else ""]
            if multi:
                dist.broadcast_object_list(box, src=0)
            tmp = Path(box[0])
            write_shards(tmp / SHARDS_DIR, model, optimizer)  # ends with a barrier: all shards on disk
            if main:
                write_checkpoint(tmp, die_midway=die_midway, model_state=consolidated_weights(tmp / SHARDS_DIR),
                                 optimizer_state=None, **contents)
        if main:
            self.prune()
        if multi:
            dist.barrier()  # nobody goes on (or reads it back) before the rename
        return final

    def prune(self) -> None:
        found = self.complete()
        keep = {p for _, p in found[-self.keep_last:]}
        scored = [(_val_loss(p), p) for _, p in found]
        scored = [(v, p) for v, p in scored if v is not None]
        if scored:
            keep.add(min(scored, key=lambda vp: vp[0])[1])
        keep.add(selected_checkpoint(self.root))
        for _, p in found:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)


def _val_loss(path: Path) -> float | None:
    try:
        value = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8")).get("val_loss")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, (int, float)) else None


def load_shards(shards: Path, par: Any, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a sharded checkpoint's model and optimizer slices into the live model, on however many
    ranks this run has (DCP reshards); collective."""
    from lmforge.distributed.checkpoint import load_sharded

    if par.name == "pipeline":
        raise UserError(f"{shards.parent} is a sharded checkpoint, which train.parallel='pipeline' cannot load; "
                        "resume it with another strategy and train.checkpoint_format='full'")
    load_sharded(shards, model, optimizer)


def resolve_resume(run_dir: Path, resume: str | bool | None) -> Path | None:
    """The checkpoint `--resume [CKPT]` names: newest complete one of the run, or CKPT exactly."""
    if not resume:
        return None
    if resume is True:
        latest = CheckpointManager(run_dir, 1).latest()
        if latest is None:
            raise UserError(f"--resume: no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
        return latest
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume: checkpoint not found: {path}")
    if not is_complete(path):
        raise UserError(f"--resume: checkpoint {path} is incomplete (no {COMPLETE} marker); refusing to load it")
    return path
