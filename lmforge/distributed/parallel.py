"""The parallelism seam: everything the training loop does that depends on how the model is spread.

The loop holds one `Parallel` and never touches DDP / FSDP / pipeline APIs (see "Parallelism seam"
in docs/ARCHITECTURE.md). `Parallel` itself is the single-process strategy; each subclass changes
only what its strategy changes:

    Parallel            one process, or a group of one: the model as it is
    DataParallel        "ddp": a full replica per rank, gradients averaged by DDP
    ShardedParallel     "fsdp" / "fsdp+tp" (lmforge/distributed/sharded.py)
    PipelineParallel    "pipeline" (lmforge/distributed/pipeline.py)

Two coordinates matter to the loop: `rank` / `world_size` (who writes files: rank 0) and
`dp_rank` / `dp_size` (which share of the global batch this rank reads). They differ where ranks
cooperate on the same examples: pipeline stages and tensor-parallel peers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import RunConfig
from lmforge.distributed.runtime import ProcessEnv, shutdown_process_group
from lmforge.train.optim import load_named_optimizer_state, named_optimizer_state

REDUCE_OPS = ("mean", "sum", "max")


class Parallel:
    """Single-process training; the base every strategy refines."""

    name = "none"

    def __init__(self, cfg: RunConfig, env: ProcessEnv, device: torch.device) -> None:
        self.cfg = cfg
        self.env = env
        self.device = device
        self.rank = env.rank
        self.world_size = env.world_size
        # Data-parallel coordinates and group; None is the default (whole-world) group.
        self.dp_rank = env.rank
        self.dp_size = env.world_size
        self.dp_group: dist.ProcessGroup | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strategy={self.name!r}, rank={self.rank}/{self.world_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, device={self.device})")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, shows progress bars and writes files."""
        return self.rank == 0

    # ---- model and steps

    def parallelize(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         loss_scale: float = 1.0, last_micro: bool = True,
                         **loss_options: Any) -> torch.Tensor:
        """Next-token loss of tokens x, targets y: backward of loss * loss_scale; returns the
        detached mean loss, the same on every rank. `loss_options` go to `model.loss`
        (head_loss, checkpoint_blocks) where the whole model runs on this rank."""
        x, y = x.to(self.device), y.to(self.device)
        return self.backward(model, lambda m: m.loss(x, y, **loss_options), loss_scale, last_micro)

    def backward(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                 loss_scale: float = 1.0, last_micro: bool = True) -> torch.Tensor:
        """Any objective's loss: backward of loss_fn(model) * loss_scale (loss_fn must run the
        model through its module call, so wrappers' hooks see it); returns the detached mean
        loss, the same on every rank. `last_micro`: the last micro-batch of a step (gradients
        are synchronised then)."""
        loss = loss_fn(model)
        (loss * loss_scale).backward()
        return self.all_reduce(loss.detach(), "mean")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **loss_options: Any) -> torch.Tensor:
        """Per-token losses (B, T) of this rank's batch, without gradients: `model.loss(...,
        reduction="none")` wherever the model is split. Collective; reduce totals with all_reduce."""
        return model.loss(x.to(self.device), y.to(self.device), reduction="none", **loss_options)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Scale gradients down to a global norm of at most `max_norm` (<= 0: measure only).

        Returns the norm before clipping; inf / nan propagate so the loop can refuse the step.
        """
        groups = self._grad_groups(model)
        if not groups:
            return torch.zeros((), device=self.device)
        total = self._global_norm(groups)
        if max_norm > 0:
            for params in groups:
                torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    def _own_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters this rank counts in the gradient norm (each shared tensor once)."""
        return list(model.parameters())

    def _grad_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        """Parameters with gradients, in groups torch can process together (one group here)."""
        params = [p for p in self._own_parameters(model) if p.grad is not None]
        return [params] if params else []

    def _global_norm(self, groups: list[list[nn.Parameter]]) -> torch.Tensor:
        """The 2-norm of all gradients: one norm per group, then the norm of those."""
        norms = [torch.nn.utils.get_total_norm([p.grad for p in params]) for params in groups]
        return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))

    # ---- collectives

    def all_reduce(self, t: torch.Tensor | float, op: str = "mean") -> torch.Tensor:
        """Reduce a metric: "mean" / "sum" over the data-parallel ranks, "max" over all ranks.

        Returns a new tensor; the input is left alone. gloo has no AVG, so mean is sum / n.
        """
        if op not in REDUCE_OPS:
            raise ValueError(f"all_reduce op must be one of {REDUCE_OPS}, got {op!r}")
        t = torch.as_tensor(t).detach().to(self.device, copy=True)
        if op == "mean" and not t.is_floating_point():
            t = t.double()
        if self.world_size == 1:
            return t
        if op == "max":
            dist.all_reduce(t, dist.ReduceOp.MAX)
        elif self.dp_size > 1:
            dist.all_reduce(t, dist.ReduceOp.SUM, group=self.dp_group)
            if op == "mean":
                t /= self.dp_size
        return t

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def shutdown(self) -> None:
        """Drop the wrappers that hold the process group, then leave the job cleanly.

        DDP's reducer and a pipeline schedule keep references to the group; dropped first, the
        group can be destroyed here rather than at interpreter exit (see shutdown_process_group)."""
        self.release_wrappers()
        shutdown_process_group()

    def release_wrappers(self) -> None:
        """Drop the wrappers this strategy built around the model (DDP, pipeline schedule)."""

    # ---- state (checkpoint names, full tensors)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """All weights under their checkpoint names, on the main rank; collective."""
        return {k: v.detach() for k, v in model.state_dict().items()}

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load full weights (every rank passes the same full dict)."""
        model.load_state_dict(state, strict=True)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """{"state": {param_name: {key: tensor}}, "param_groups": [...]}, full, on the main rank."""
        return named_optimizer_state(model, optimizer)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        """Load what `optimizer_state_dict` gave; hyper-parameters stay as configured now."""
        load_named_optimizer_state(model, optimizer, state)


class _LossOf(nn.Module):
    """Makes an objective's loss the forward, so DDP's hooks see the training forward.

    Only DDP holds this wrapper; the loop keeps the bare model, so names, evaluation and
    sampling are unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[[nn.Module], torch.Tensor]) -> torch.Tensor:
        return loss_fn(self.model)


class DataParallel(Parallel):
    """"ddp": every rank holds the whole model; DDP averages gradients in buckets during backward."""

    name = "ddp"

    def __init__(self, cfg: RunConfig, env: ProcessEnv, device: torch.device) -> None:
        super().__init__(cfg, env, device)
        self._ddp: DistributedDataParallel | None = None

    def parallelize(self, model: nn.Module) -> nn.Module:
        model = super().parallelize(model)
        # DDP broadcasts rank 0's weights at construction, so every replica starts equal.
        self._ddp = DistributedDataParallel(
            _LossOf(model),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            gradient_as_bucket_view=True,
        )
        return model

    def release_wrappers(self) -> None:
        self._ddp = None

    def backward(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                 loss_scale: float = 1.0, last_micro: bool = True) -> torch.Tensor:
        if self._ddp is None or self._ddp.module.model is not model:
            raise RuntimeError("forward_backward needs the model returned by parallelize()")
        # Accumulation steps skip the gradient all-reduce; the last micro-batch syncs the sum.
        sync = contextlib.nullcontext() if last_micro else self._ddp.no_sync()
        with sync:
            loss = self._ddp(loss_fn)
            (loss * loss_scale).backward()
        return self.all_reduce(loss.detach(), "mean")
