"""Sharded checkpoints through torch.distributed.checkpoint (DCP), and their consolidation.

With FSDP no rank holds the whole model, and gathering it on rank 0 to write one file costs a
full copy of the weights (and optimizer state) in one process. `save_sharded` instead has every
rank write its own shards, in parallel, as safetensors files (DCP's Hugging Face storage: tensors
and a JSON header, never pickle). DCP records where each slice belongs, so `load_sharded` reads
them back on any number of ranks, resharding as needed, and `consolidate` joins the model's
weights into the single `model.safetensors` of an lmforge checkpoint, in a plain process.
`lmforge pretrain` with train.checkpoint_format="sharded" writes its checkpoints' `shards/` with
`write_shards` (lmforge/train/checkpoint.py).

    SHARDED_DIR/*.safetensors      model.<name> and optim.state.<name>.<key> slices, per rank
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from lmforge.atomic import atomic_write_bytes
from lmforge.errors import UserError

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """This rank's slices under their full names: {"model": {...}, "optim": {"state": {...}}}."""
    state: dict[str, Any] = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        # Tensors only: hyper-parameters come from the config when a run resumes.
        state["optim"] = {"state": get_optimizer_state_dict(model, optimizer)["state"]}
    return state


def is_multi_process() -> bool:
    """A process group of more than one rank is up (DCP then coordinates the ranks)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def write_shards(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Every rank writes its shards into `directory` (created here; may be a temporary one); collective.

    Without a process group (or in a group of one) the one process writes everything.
    """
    directory = Path(directory)
    multi = is_multi_process()
    if not multi or dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if multi:
        dist.barrier()
    writer = dcp.HuggingFaceStorageWriter(str(directory), save_distributed=True)
    # An optimizer before its first step has no state; asking DCP for it would create some with a
    # zero-learning-rate step, which would advance AdamW's step count: save the model alone.
    has_state = optimizer is not None and bool(optimizer.state)
    dcp.save(_state(model, optimizer if has_state else None), storage_writer=writer, no_dist=not multi)
    if multi:
        dist.barrier()


def save_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Every rank writes its shards of the model (and optimizer) under `directory`; collective."""
    directory = Path(directory)
    if directory.exists():  # every rank sees the same (shared) file system, so all stop here
        raise UserError(f"{directory} already exists: refusing to overwrite a checkpoint")
    multi = is_multi_process()
    # All ranks write into one temporary directory that rank 0 then renames into place.
    tmp = directory.with_name(f".{directory.name}.sharded.tmp")
    write_shards(tmp, model, optimizer)
    if not multi or dist.get_rank() == 0:
        tmp.rename(directory)
    if multi:
        dist.barrier()


def _load(state: dict[str, Any], directory: Path, no_dist: bool) -> None:
    """Fill `state`'s tensors in place from the shards (resharding to their current layout)."""
    with warnings.catch_warnings():
        # DCP warns that it loads "in a single process" even when asked to (no_dist=True).
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(directory)), no_dist=no_dist)


def load_sharded(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load shards written by `save_sharded` on any number of ranks into a parallelized model."""
    directory = Path(directory)
    if not any(directory.glob("*.safetensors")):
        raise UserError(f"{directory}: no sharded checkpoint here (no .safetensors files)")
    multi = is_multi_process()
    metadata = dcp.HuggingFaceStorageReader(str(directory)).read_metadata()
    saved_optimizer = any(key.startswith(OPTIM_PREFIX) for key in metadata.state_dict_metadata)
    state = _state(model, optimizer if saved_optimizer else None)
    _load(state, directory, no_dist=not multi)
    set_model_state_dict(model, state["model"])
    if optimizer is not None and not saved_optimizer:
        optimizer.state.clear()  # saved before the first step: back to no state
    elif optimizer is not None:
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        full = get_optimizer_state_dict(model, optimizer)
        full["state"] = state["optim"]["state"]
        set_optimizer_state_dict(model, optimizer, full)
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update(settings)


def consolidated_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """The full model weights of a sharded checkpoint under checkpoint names (one process, CPU).

    Names lose the "model." prefix; the optimizer's shards are not read. A training checkpoint
    directory stands for its `shards/`; a full checkpoint (one `model.safetensors`) is refused.
    """
    directory = Path(directory)
    if (directory / "shards").is_dir():  # a training checkpoint written with sharded format
        directory = directory / "shards"
    elif (directory / "model.safetensors").is_file() and not (directory / ".metadata").exists():
        raise UserError(f"{directory} is already a full checkpoint: its weights are "
                        f"{directory / 'model.safetensors'}, nothing to consolidate")
    if not any(directory.glob("*.safetensors")):
        raise UserError(f"{directory}: no sharded checkpoint here (no .safetensors files)")
    reader = dcp.HuggingFaceStorageReader(str(directory))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise UserError(f"{directory}: the sharded checkpoint holds no model weights")
    _load(state, directory, no_dist=True)
    return {key[len(MODEL_PREFIX):]: t.contiguous() for key, t in state.items()}


def consolidate(directory: str | Path, out_file: str | Path) -> Path:
    """Join the model weights of a sharded checkpoint into one safetensors file (one process),
    an lmforge `model.safetensors`."""
    out_file = Path(out_file)
    weights = consolidated_weights(directory)
    atomic_write_bytes(out_file, safetensors.torch.save(weights, metadata={"format": "pt"}))
    return out_file
