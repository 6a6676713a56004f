"""Parallel training on PyTorch's own engine: DDP, FSDP2, pipeline and tensor parallelism.

The training loop talks to one object, made here from the config and the torchrun environment:

    par = init_parallel(cfg)
    model = par.parallelize(model)
    loss = par.forward_backward(model, x, y, loss_scale, last_micro)

Everything parallel lives in this package, applied to the model from outside; lmforge/model.py
knows nothing of it. See docs/ARCHITECTURE.md ("Parallelism seam") and docs/distributed.md.
"""

from __future__ import annotations

from lmforge.config import RunConfig
from lmforge.distributed.parallel import DataParallel, Parallel
from lmforge.distributed.runtime import (
    ProcessEnv,
    choose_backend,
    choose_device,
    init_process_group,
)
from lmforge.errors import UserError

__all__ = ["Parallel", "ProcessEnv", "check_layout", "init_parallel", "strategy_for"]


def strategy_for(cfg: RunConfig, world_size: int) -> str:
    """The strategy a run uses: `train.parallel`, where "none" with several processes is "ddp"."""
    name = cfg.train.parallel
    if name == "none" and world_size > 1:
        return "ddp"
    return name


def check_layout(cfg: RunConfig, strategy: str, world_size: int) -> None:
    """Raise a UserError if the model cannot be laid out over `world_size` ranks this way."""
    if strategy == "none" and world_size > 1:
        raise UserError(f"train.parallel='none' cannot run on {world_size} processes")
    if strategy == "pipeline":
        from lmforge.distributed.pipeline import pipeline_stages

        pipeline_stages(cfg, world_size)
        if cfg.train.batch_size % cfg.train.pipeline_microbatches:
            raise UserError(f"train.pipeline_microbatches={cfg.train.pipeline_microbatches} must divide "
                            f"train.batch_size={cfg.train.batch_size}")
    if strategy == "fsdp+tp":
        from lmforge.distributed.sharded import check_tensor_parallel

        check_tensor_parallel(cfg.model, cfg.train.tp_size, world_size)


def init_parallel(cfg: RunConfig, env: ProcessEnv | None = None) -> Parallel:
    """Join the process group torchrun describes (if any) and build the seam for `train.parallel`."""
    env = env or ProcessEnv.from_environ()
    device = choose_device(cfg.train.device, env)
    name = strategy_for(cfg, env.world_size)
    backend = choose_backend(cfg.train.dist_backend, device)
    check_layout(cfg, name, env.world_size)  # before joining: a mistake fails fast on every rank
    if name == "none":
        return Parallel(cfg, env, device)
    init_process_group(env, backend, device, cfg.train.dist_timeout_s)
    if name == "ddp":
        return DataParallel(cfg, env, device)
    if name in ("fsdp", "fsdp+tp"):
        from lmforge.distributed.sharded import ShardedParallel

        return ShardedParallel(cfg, env, device, tp_size=cfg.train.tp_size if name == "fsdp+tp" else 1)
    if name == "pipeline":
        from lmforge.distributed.pipeline import PipelineParallel

        return PipelineParallel(cfg, env, device)
    raise UserError(f"train.parallel={name!r} is not a known strategy")  # validate() prevents this
