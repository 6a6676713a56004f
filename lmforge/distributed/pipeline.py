"""Pipeline parallelism ("pipeline"): the layers split into one stage per rank.

Stage s of S keeps layers [s * L/S, (s+1) * L/S) under their original names; the first stage also
keeps the token (and position) embeddings, the last the final norm and the head. Each batch is
cut into `train.pipeline_microbatches` micro-batches that flow through the stages under a
torch.distributed.pipelining schedule:

    gpipe   all micro-batch forwards, then all backwards: simple, activations of every
            micro-batch alive at the peak
    1f1b    after a warm-up, one forward then one backward: at most S micro-batches' activations

The loss is computed on the last stage, so every rank receives it by broadcast. With tied
embeddings the last stage holds its own copy of the embedding matrix as `lm_head`; the two
copies start equal and receive the same summed gradient, so they stay equal (as in Megatron-LM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.nn.parallel import DistributedDataParallel

from lmforge.config import RunConfig
from lmforge.distributed.parallel import Parallel
from lmforge.distributed.runtime import ProcessEnv
from lmforge.errors import UserError
from lmforge.train.optim import load_named_optimizer_state, named_optimizer_state

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}

TIED_HEAD = "lm_head.weight"  # the last stage's copy of ...
TIED_EMBEDDING = "embed_tokens.weight"  # ... the first stage's embedding matrix


def stage_layers(n_layers: int, n_stages: int, stage: int) -> range:
    """The layer indices stage `stage` owns (an equal, contiguous share)."""
    if n_layers % n_stages:
        raise UserError(
            f"train.parallel='pipeline' with {n_stages} stages needs model.n_layers divisible by "
            f"{n_stages}, got model.n_layers={n_layers}: change the layer count, the number of "
            "processes or train.pipeline_stages"
        )
    per = n_layers // n_stages
    return range(stage * per, (stage + 1) * per)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward.

    The schedule reports the loss it back-propagates; this way that is the plain mean loss while
    gradients still carry the micro-batch and accumulation factors.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def pipeline_stages(cfg: RunConfig, world_size: int) -> int:
    """Stages of the pipeline: `train.pipeline_stages`, 0 meaning one per process."""
    stages = cfg.train.pipeline_stages or world_size
    if world_size % stages:
        raise UserError(f"train.pipeline_stages={stages} must divide the number of processes {world_size}")
    stage_layers(cfg.model.n_layers, stages, 0)
    return stages


class TiedHead(nn.Embedding):
    """The last stage's copy of a tied embedding matrix, used as the output head.

    An Embedding, so the optimizer groups it as one (no weight decay), like its twin on stage 0.
    """

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.weight)


class _CheckpointedStage(nn.Module):
    """A stage whose blocks recompute their activations in backward (train.activation_checkpointing):
    the schedule calls the stage with its input only, so the option is passed here."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.model(h, checkpoint_blocks=True)


def split_stage(model: nn.Module, n_stages: int, stage: int) -> nn.Module:
    """Cut `model` down (in place) to what stage `stage` of `n_stages` computes."""
    keep = {str(i) for i in stage_layers(model.cfg.n_layers, n_stages, stage)}
    for name in [k for k in model.layers if k not in keep]:
        del model.layers[name]
    first, last = stage == 0, stage == n_stages - 1
    if last and not first and model.lm_head is None:
        # Tied embeddings: give the last stage its own copy of the embedding as the head.
        model.lm_head = TiedHead.from_pretrained(model.embed_tokens.weight.detach().clone(), freeze=False)
    if not first:
        model.embed_tokens = None
        model.embed_positions = None
    if not last:
        model.norm = None
        model.lm_head = None
    return model


class PipelineParallel(Parallel):
    """`train.pipeline_stages` stages (default: one per rank), replicated by DDP over the rest.

    Ranks form a (dp, pp) mesh: rank = replica * stages + stage. A replica's stages share its
    batch; the replicas split the global batch like DDP ranks, and DDP (wrapping each stage, as
    torch.distributed.pipelining supports) averages their gradients.
    """

    name = "pipeline"

    def __init__(self, cfg: RunConfig, env: ProcessEnv, device: torch.device) -> None:
        super().__init__(cfg, env, device)
        self.n_stages = pipeline_stages(cfg, env.world_size)
        replicas = env.world_size // self.n_stages
        self.stage_index = env.rank % self.n_stages
        self.dp_rank, self.dp_size = env.rank // self.n_stages, replicas
        self.n_microbatches = cfg.train.pipeline_microbatches
        self.first = self.stage_index == 0
        self.last = self.stage_index == self.n_stages - 1
        self.tied = cfg.model.tie_embeddings and self.n_stages > 1
        if replicas > 1:
            mesh = init_device_mesh(device.type, (replicas, self.n_stages), mesh_dim_names=("dp", "pp"))
            self.pp_group = mesh["pp"].get_group()
            self.dp_group = mesh["dp"].get_group()
        else:
            self.pp_group = dist.group.WORLD
        # In each replica, the first and the last stage sum the gradients of their copies of a
        # tied embedding (new_group is collective: every rank creates every pair).
        self._tied_group = None
        if self.tied:
            for replica in range(replicas):
                pair = dist.new_group([replica * self.n_stages, (replica + 1) * self.n_stages - 1])
                if replica == self.dp_rank:
                    self._tied_group = pair
        self._schedule: Any = None
        self._model: nn.Module | None = None
        self._loss_scale = 1.0
        self._training = True

    def parallelize(self, model: nn.Module) -> nn.Module:
        model = split_stage(model.to(self.device), self.n_stages, self.stage_index)
        computed: nn.Module = _CheckpointedStage(model) if self.cfg.train.activation_checkpointing else model
        if self.dp_size > 1:  # DDP also starts every replica of this stage from replica 0's weights
            # find_unused_parameters=True turns off DDP's bucket rebuilding after the first step,
            # which miscounts when several micro-batches run backward in one step.
            computed = DistributedDataParallel(
                computed, process_group=self.dp_group, find_unused_parameters=True,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.tied and (self.first or self.last):  # the head copy starts as stage 0's embedding
            weight = model.embed_tokens.weight if self.first else model.lm_head.weight
            dist.broadcast(weight.data, group=self._tied_group, group_src=0)
        stage = PipelineStage(computed, self.stage_index, self.n_stages, self.device, group=self.pp_group)
        schedule = SCHEDULES[self.cfg.train.pipeline_schedule]
        # scale_grads=False: _micro_loss already divides by the micro-batch count; the
        # schedule's own scaling would also shrink gradients accumulated by earlier calls.
        self._schedule = schedule(stage, self.n_microbatches, loss_fn=self._micro_loss, scale_grads=False)
        self._model = model
        return model

    def release_wrappers(self) -> None:
        self._schedule = None

    def _micro_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training: a micro-batch's mean cross-entropy, its gradient carrying the accumulation
        scale. Evaluation: the per-token cross-entropies (B, T)."""
        if not self._training:
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                   reduction="none").view(targets.shape)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return _ScaleGradient.apply(loss, self._loss_scale / self.n_microbatches)

    def _check_batch(self, x: torch.Tensor) -> None:
        if x.shape[0] % self.n_microbatches:
            raise UserError(
                f"a batch of {x.shape[0]} sequences cannot be cut into "
                f"train.pipeline_microbatches={self.n_microbatches} micro-batches"
            )

    def _inputs(self, x: torch.Tensor, y: torch.Tensor, losses: list) -> tuple[tuple, dict]:
        """What this stage feeds the schedule: the tokens (first) and the targets (last)."""
        args = (x.to(self.device),) if self.first else ()
        kwargs = {"target": y.to(self.device), "losses": losses} if self.last else {}
        return args, kwargs

    def forward_backward(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                         loss_scale: float = 1.0, last_micro: bool = True,
                         **loss_options: Any) -> torch.Tensor:
        """The last stage computes the plain cross-entropy itself (_micro_loss), so loss_options
        (a compiled or fused head loss) do not apply; activation checkpointing is the stage's."""
        if model is not self._model:
            raise RuntimeError("forward_backward needs the stage returned by parallelize()")
        self._check_batch(x)
        self._training, self._loss_scale = True, loss_scale
        losses: list[torch.Tensor] = []
        args, kwargs = self._inputs(x, y, losses)
        self._schedule.step(*args, return_outputs=False, **kwargs)
        loss = torch.stack(losses).detach().mean() if self.last else torch.zeros((), device=self.device)
        dist.broadcast(loss, group=self.pp_group, group_src=self.n_stages - 1)  # only the last stage has it
        loss = self.all_reduce(loss, "mean")  # over the replicas' shares of the global batch
        if last_micro and self.tied and (self.first or self.last):
            weight = model.embed_tokens.weight if self.first else model.lm_head.weight
            dist.all_reduce(weight.grad, dist.ReduceOp.SUM, group=self._tied_group)
        return loss

    def backward(self, model: nn.Module, loss_fn: Callable[[nn.Module], torch.Tensor],
                 loss_scale: float = 1.0, last_micro: bool = True) -> torch.Tensor:
        raise UserError("train.parallel='pipeline' trains next-token objectives only (pre-training); "
                        "use ddp or fsdp for this stage")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, **loss_options: Any) -> torch.Tensor:
        self._check_batch(x)
        self._training = False
        losses: list[torch.Tensor] = []
        args, kwargs = self._inputs(x, y, losses)
        self._schedule.eval(*args, **kwargs)
        per_token = torch.cat(losses) if self.last else torch.empty(y.shape, device=self.device)
        dist.broadcast(per_token, group=self.pp_group, group_src=self.n_stages - 1)
        return per_token

    def _own_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        # The last stage's tied copy is counted once, on the first stage.
        return [p for n, p in model.named_parameters() if not (self.tied and self.last and n == TIED_HEAD)]

    def _global_norm(self, groups: list[list[nn.Parameter]]) -> torch.Tensor:
        local = super()._global_norm(groups)
        squares = local.double() ** 2
        # Each stage holds different parameters; replicas hold the same, already averaged.
        dist.all_reduce(squares, dist.ReduceOp.SUM, group=self.pp_group)
        return squares.sqrt().to(local.dtype)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        total = super().clip_grad_norm(model, max_norm)
        if max_norm > 0 and self.tied and self.last and model.lm_head.weight.grad is not None:
            # The tied copy was left out of the list above: scale it like its twin.
            torch.nn.utils.clip_grads_with_norm_([model.lm_head.weight], max_norm, total)
        return total

    # ---- state: each stage holds a slice; the main rank gathers the whole

    def _to_checkpoint_name(self, name: str) -> str | None:
        """A stage parameter's checkpoint name, None for the tied copy (saved by stage 0)."""
        return None if self.tied and self.last and name == TIED_HEAD else name

    def _gather(self, local: Any) -> list[Any] | None:
        """Every stage's `local` on the main rank (replicas hold copies: replica 0 suffices)."""
        everything = [None] * self.n_stages if self.stage_index == 0 else None
        dist.gather_object(local, everything, group=self.pp_group, group_dst=0)
        return everything if self.is_main else None

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        local = {k: v.detach().cpu() for k, v in model.state_dict().items() if self._to_checkpoint_name(k)}
        parts = self._gather(local)
        return {k: v for part in parts for k, v in part.items()} if parts else {}

    def load_full_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        own = {k: state[self._source_name(k)] for k in model.state_dict()}
        model.load_state_dict(own, strict=True)

    def _source_name(self, name: str) -> str:
        return TIED_EMBEDDING if self._to_checkpoint_name(name) is None else name

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        local = named_optimizer_state(model, optimizer)
        local["state"] = {
            k: {key: t.cpu() for key, t in v.items()}
            for k, v in local["state"].items() if self._to_checkpoint_name(k)
        }
        parts = self._gather(local)
        if not parts:
            return {}
        state: dict[str, Any] = {}
        groups: dict[Any, dict[str, Any]] = {}  # by group name (lmforge's groups) or position
        for part in parts:
            state.update(part["state"])
            for i, group in enumerate(part["param_groups"]):
                names = [n for n in group["params"] if not (self.tied and n == TIED_HEAD)]
                merged = groups.setdefault(group.get("name", i), dict(group, params=[]))
                merged["params"] += names
        return {"state": state, "param_groups": list(groups.values())}

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict[str, Any]) -> None:
        own = {}
        for name, _ in model.named_parameters():
            saved = state["state"].get(self._source_name(name))
            if saved is not None:
                own[name] = saved
        load_named_optimizer_state(model, optimizer, {"state": own, "param_groups": []})
