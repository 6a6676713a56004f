"""FSDP2 ("fsdp") and tensor parallel inside FSDP ("fsdp+tp"), applied from outside the model.

FSDP2 (`fully_shard`) turns each parameter into a DTensor sharded along dim 0 over the
data-parallel ranks. Each transformer block is one unit: its parameters are all-gathered just
before its forward (and again for backward) and its gradients reduce-scattered right after, so
only one or two blocks are ever whole in memory. The root unit holds the embeddings, the final
norm and the head.

Tensor parallel (Megatron-style) cuts each block's matrices across `tp_size` ranks: q/k/v and
gate/up column-wise (each rank computes some heads / some hidden units), o and down row-wise
(partial sums, all-reduced once per sub-layer). The 2D mesh is ("dp", "tp"): TP inside a row of
ranks, FSDP down the columns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from lmforge.config import ModelConfig, RunConfig
from lmforge.distributed.parallel import Parallel
from lmforge.distributed.runtime import ProcessEnv
from lmforge.errors import UserError

# Full (unsharded) state on rank 0, in CPU memory: what a single-file checkpoint needs.
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


def check_tensor_parallel(model_cfg: ModelConfig, tp_size: int, world_size: int) -> None:
    """Tensor parallel needs whole heads (query and key/value) and hidden units on every rank."""
    if world_size % tp_size:
        raise UserError(f"train.tp_size={tp_size} must divide the world size {world_size}")
    checks = (
        ("model.n_heads", model_cfg.n_heads),
        ("model.n_kv_heads (key/value heads)", model_cfg.kv_heads),
        ("the MLP width (model.d_ff)", model_cfg.ffn_dim),
    )
    for what, value in checks:
        if value % tp_size:
            raise UserError(
                f"train.tp_size={tp_size} must divide {what}={value}: tensor parallel gives each "
                f"rank whole heads; pick a tp_size dividing it"
            )


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Column-wise q/k/v and gate/up, row-wise o and down, in every block (in place)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    for block in model.layers.values():
        plan: dict[str, Any] = {
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(),
        }
        if hasattr(block.mlp, "gate_proj"):
            plan["mlp.gate_proj"] = ColwiseParallel()
        parallelize_module(block, tp_mesh, plan)
        # The attention reshapes by its head counts: on this rank it holds 1/tp of each.
        block.self_attn.n_heads //= tp
        block.self_attn.n_kv_heads //= tp


class ShardedParallel(Parallel):
    """"fsdp" (tp_size 1) or "fsdp+tp"."""

    def __init__(self, cfg: RunConfig, env: ProcessEnv, device: torch.device, tp_size: int = 1) -> None:
        super().__init__(cfg, env, device)
        self.name = "fsdp+tp" if tp_size > 1 else "fsdp"
        if cfg.train.optimizer == "muon":
            raise UserError(
                f"train.optimizer='muon' cannot run under train.parallel={self.name!r}: Muon "
                "orthogonalises whole matrices and FSDP gives each rank a shard; use ddp or adamw"
            )
        if tp_size > 1:
            check_tensor_parallel(cfg.model, tp_size, env.world_size)
            self.mesh = init_device_mesh(device.type, (env.world_size // tp_size, tp_size),
                                         mesh_dim_names=("dp", "tp"))
            self.dp_mesh = self.mesh["dp"]
        else:
            self.mesh = init_device_mesh(device.type, (env.world_size,), mesh_dim_names=("dp",))
            self.dp_mesh = self.mesh
        self.tp_size = tp_size
        self.dp_rank = self.dp_mesh.get_local_rank()
        self.dp_size = self.dp_mesh.size()
        self.dp_group = self.dp_mesh.get_group()

    def parallelize(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        # FSDP does not synchronise initial weights: start every rank from rank 0's.
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
        if self.tp_size > 1:
            apply_tensor_parallel(model, self.mesh["tp"])
        # With bf16 compute (train.dtype; the default on GPUs): bf16 compute and communication
        # of parameters, fp32 gradient reduction and fp32 master weights. Otherwise all fp32.
        if self.cfg.train.uses_bf16(self.device.type):
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            mp = MixedPrecisionPolicy()
        for block in model.layers.values():
            fully_shard(block, mesh=self.dp_mesh, mp_policy=mp)
        # The root keeps its (embedding / head) parameters gathered after forward: backward needs
        # them again at once, and the head is the last thing forward uses.
        fully_shard(model, mesh=self.dp_mesh, mp_policy=mp, reshard_after_forward=False)
        return model

    def backward(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                 loss_scale: float = 1.0, last_micro: bool = True) -> torch.Tensor:
        # Accumulation steps keep unsharded gradients locally; the last one reduce-scatters.
        model.set_requires_gradient_sync(last_micro)
        return super().backward(model, loss_fn, loss_scale, last_micro)

    def _grad_groups(self, model: nn.Module) -> list[list[nn.Parameter]]:
        # With TP, block gradients live on the 2D mesh and the rest on the dp mesh; DTensor ops
        # cannot mix meshes, so norms and clipping go one mesh at a time.
        by_mesh: dict[Any, list[nn.Parameter]] = {}
        for params in super()._grad_groups(model):
            for p in params:
                by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
        return list(by_mesh.values())

    def _global_norm(self, groups: list[list[nn.Parameter]]) -> torch.Tensor:
        norms = []
        for params in groups:
            norm = super()._global_norm([params])
            # A norm over DTensor shards is itself a DTensor pending its reduction: finish it.
            norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
        return torch.linalg.vector_norm(torch.stack(norms))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return get_model_state_dict(model, options=FULL_ON_RANK0)

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    # DCP's state-dict functions first give an optimizer without state some, by a step at lr 0
    # (AdamW's step count then starts at 1). Before the first step there is nothing to exchange,
    # so those cases stay out of DCP and a fresh run matches a single process exactly.

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if not optimizer.state:
            return super().optimizer_state_dict(model, optimizer)  # no tensors: names only
        return get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0)

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        if not state.get("state"):
            optimizer.state.clear()  # back to before the first step (e.g. a rollback to step 0)
            return
        # Keep the hyper-parameters configured now (as the single-process loader does).
        configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
        for group, settings in zip(optimizer.param_groups, configured, strict=True):
            group.update(settings)
