"""Worker for tests/test_distributed.py, run by ONE torchrun launch of 2 processes (gloo, CPU).

For each strategy it trains the same tiny model on the same global batches as a single-process
reference that every rank computes privately (no collectives), and records how far the strategy's
gradients and losses are from the reference. Rank 0 writes the results to the JSON file named on
the command line; the test asserts on them. Launch costs dominate on CPU, so one launch checks all.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT.json WORKDIR

With 4 processes it checks only the pipeline replicated by data parallelism (2 stages x 2).
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lmforge.config import load_config
from lmforge.distributed import init_parallel
from lmforge.distributed.checkpoint import consolidate, load_sharded, save_sharded
from lmforge.distributed.runtime import shutdown_process_group
from lmforge.model import Transformer
from lmforge.train.optim import build_optimizer

GLOBAL_BATCH, SEQ, STEPS = 8, 16, 10
MODEL = ["model.vocab_size=96", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
         "model.n_kv_heads=2", "model.max_seq_len=16", "model.d_ff=64"]


def config(parallel: str, *extra: str):
    return load_config(overrides=[*MODEL, f"train.parallel={parallel}", f"train.batch_size={GLOBAL_BATCH}",
                                  "train.lr=3e-3", "train.pipeline_microbatches=4", "train.tp_size=2",
                                  "train.device=cpu", *extra])


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 96, (GLOBAL_BATCH, SEQ + 1), generator=g)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def share(t: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    per = t.shape[0] // size
    return t[rank * per:(rank + 1) * per]


def full_grads(par, model) -> dict[str, torch.Tensor]:
    """Every gradient, whole, under its checkpoint name, on every rank (collective)."""
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()
    if par.name == "pipeline":  # each stage has its own slice: exchange them
        parts = [None] * par.world_size
        dist.all_gather_object(parts, {k: v for k, v in grads.items() if par._to_checkpoint_name(k)})
        grads = {k: v for part in parts for k, v in part.items()}
    return grads


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def reference_run(cfg, data, steps: int, micro: int = 1):
    """Single process, whole global batch, no collectives: the truth each strategy must match."""
    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    losses, first_grads = [], None
    for step in range(steps):
        x, y = data[step]
        total = 0.0
        for m in range(micro):
            loss = model.loss(share(x, m, micro), share(y, m, micro))
            (loss / micro).backward()
            total += float(loss) / micro
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model, opt, losses, first_grads


def strategy_run(par, cfg, data, steps: int, micro: int = 1, state=None):
    torch.manual_seed(cfg.train.seed)
    model = par.parallelize(Transformer(cfg.model))
    opt = build_optimizer(model, cfg.train, par.device)
    if state is not None:
        par.load_full_state_dict(model, state["model"])
        par.load_optimizer_state_dict(model, opt, state["optim"])
    return strategy_run_continue(par, cfg, model, opt, data[:steps], micro, keep_first_grads=True)


def check(name: str, parallel: str, *extra: str, micro: int = 1, workdir: Path) -> dict:
    cfg = config(parallel, *extra)
    par = init_parallel(cfg)
    data = batches(STEPS)
    ref_model, ref_opt, ref_losses, ref_grads = reference_run(cfg, data, STEPS, micro)
    model, opt, losses, grads = strategy_run(par, cfg, data, STEPS, micro)
    result = {
        "strategy": par.name, "dp_size": par.dp_size,
        "grad_diff_step1": max_diff(grads, ref_grads),
        "loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True)),
        "losses": losses, "ref_losses": ref_losses,
    }
    # Evaluation: per-token losses of this rank's share equal the reference's on the same rows.
    x, y = batches(STEPS + 1)[STEPS]
    x, y = share(x, par.dp_rank, par.dp_size), share(y, par.dp_rank, par.dp_size)
    with torch.no_grad():
        expected = ref_model.loss(x, y, reduction="none")
    result["eval_diff"] = float((par.evaluate(model, x, y) - expected).abs().max())
    # Full state: the weights after training match the reference's, under the reference's names.
    weights = par.full_state_dict(model)
    osd = par.optimizer_state_dict(model, opt)
    if par.is_main:
        result["weights_diff"] = max_diff(weights, ref_model.state_dict())
        result["optimizer_keys_match"] = set(osd["state"]) == {n for n, _ in ref_model.named_parameters()}
    # Resume: a fresh model loaded from the full state continues exactly like the original.
    # The seam's dicts may alias live tensors (the loop saves them at once): copy before training on.
    box = [copy.deepcopy({"model": weights, "optim": osd})]
    dist.broadcast_object_list(box, src=0)
    more = batches(STEPS + 3)[STEPS:]
    _, _, cont_losses, _ = strategy_run_continue(par, cfg, model, opt, more, micro)
    _, _, resumed_losses, _ = strategy_run(par, cfg, more, 3, micro, state=box[0])
    result["resume_diff"] = max(abs(a - b) for a, b in zip(cont_losses, resumed_losses, strict=True))
    if parallel == "fsdp":
        result.update(sharded_checkpoint(par, cfg, model, opt, workdir))
    return result


def strategy_run_continue(par, cfg, model, opt, data, micro, keep_first_grads=False):
    """Train an existing (model, optimizer) through the seam: this rank's share of each global
    batch, `micro` accumulation steps, global-norm clipping, AdamW. Returns the per-step losses
    and, with keep_first_grads, the full gradients of the first step."""
    losses, first_grads = [], None
    for x, y in data:
        x, y = share(x, par.dp_rank, par.dp_size), share(y, par.dp_rank, par.dp_size)
        total = 0.0
        for m in range(micro):
            loss = par.forward_backward(model, share(x, m, micro), share(y, m, micro),
                                        loss_scale=1.0 / micro, last_micro=m == micro - 1)
            total += float(loss) / micro
        if keep_first_grads and first_grads is None:
            first_grads = full_grads(par, model)
        par.clip_grad_norm(model, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return model, opt, losses, first_grads


def sharded_checkpoint(par, cfg, model, opt, workdir: Path) -> dict:
    """DCP save on 2 ranks; consolidate to one safetensors file; compare with the full state."""
    directory = workdir / "dcp"
    save_sharded(directory, model, opt)
    full = par.full_state_dict(model)
    out = {}
    if par.is_main:
        from safetensors.torch import load_file

        consolidate(directory, workdir / "consolidated.safetensors")
        out["consolidated_diff"] = max_diff(load_file(workdir / "consolidated.safetensors"), full)
        out["consolidated_path"] = str(workdir / "consolidated.safetensors")
    # Reload the shards into a freshly sharded model: the same weights come back.
    torch.manual_seed(0)
    fresh = par.parallelize(Transformer(cfg.model))
    fresh_opt = build_optimizer(fresh, cfg.train, par.device)
    load_sharded(directory, fresh, fresh_opt)
    reloaded = par.full_state_dict(fresh)
    if par.is_main:
        out["sharded_reload_diff"] = max_diff(reloaded, full)
    dist.barrier()
    return out


def main() -> None:
    out_path, workdir = Path(sys.argv[1]), Path(sys.argv[2])
    if int(os.environ["WORLD_SIZE"]) == 4:  # 2 pipeline stages x 2 data-parallel replicas
        results = {
            "pipeline_x_dp": check("pipeline_x_dp", "pipeline", "train.pipeline_stages=2",
                                   "train.pipeline_microbatches=2", micro=2,
                                   workdir=workdir),
        }
    else:
        results = all_strategies(workdir)
    if dist.get_rank() == 0:
        out_path.write_text(json.dumps(results, indent=1))
    dist.barrier()  # every rank is past its last collective
    shutdown_process_group()  # the CLI's teardown: a rank that finished exits 0


def all_strategies(workdir: Path) -> dict:
    return {
        "ddp": check("ddp", "ddp", workdir=workdir),
        "ddp_accumulate": check("ddp_accumulate", "ddp", micro=2, workdir=workdir),
        "fsdp": check("fsdp", "fsdp", workdir=workdir),
        "pipeline_1f1b": check("pipeline_1f1b", "pipeline", "train.pipeline_schedule=1f1b", workdir=workdir),
        "pipeline_gpipe_untied": check("pipeline_gpipe_untied", "pipeline", "train.pipeline_schedule=gpipe",
                                       "model.tie_embeddings=false", micro=2, workdir=workdir),
        "fsdp+tp": check("fsdp+tp", "fsdp+tp", workdir=workdir),
    }


if __name__ == "__main__":
    main()
