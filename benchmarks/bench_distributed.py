"""Training throughput of each parallel strategy vs one process, side by side in one run.

The same model and the same global batch per optimizer step (synthetic tokens) train for a few
steps: once in a single process, then under `torchrun --standalone --nproc_per_node=N` for each
strategy, through the parallelism seam exactly as `lmforge pretrain` uses it. Reported: tokens per
second over the timed steps (after warm-up) and the ratio to the single process.

On a CPU machine with gloo, N processes of one thread each use N cores where the
single process uses one, so the ratio mixes that extra compute with each strategy's
communication and scheduling cost; on GPUs with NCCL the same script measures scaling.

    python benchmarks/bench_distributed.py [--nproc 2] [--steps 8] [--preset tiny]

With --nproc 1 each strategy still runs under torchrun (one rank, NCCL on a GPU): the cost of
the wrapper itself against the bare model. "pipeline" and "fsdp+tp" need two ranks or more and
are skipped there. On CUDA the steps run under bf16 autocast, as `lmforge pretrain` runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = ["ddp", "fsdp", "pipeline", "fsdp+tp"]


def worker(args: argparse.Namespace) -> None:
    """One measurement (single process or one rank of a torchrun job)."""
    import torch

    from lmforge.config import load_config
    from lmforge.distributed import init_parallel
    from lmforge.model import Transformer
    from lmforge.train.optim import build_optimizer

    cfg = load_config(preset=args.preset, overrides=[
        f"train.parallel={args.parallel}", f"train.batch_size={args.batch}", f"train.seq_len={args.seq}",
        "train.pipeline_microbatches=4", "train.tp_size=2", "model.n_kv_heads=2"])
    par = init_parallel(cfg)
    torch.manual_seed(0)
    model = par.parallelize(Transformer(cfg.model))
    opt = build_optimizer(model, cfg.train, par.device)
    global_batch = args.batch * par.dp_size
    g = torch.Generator().manual_seed(0)
    cuda = par.device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    times = []
    for _ in range(args.warmup + args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (global_batch, args.seq + 1), generator=g)
        per = args.batch
        share = tokens[par.dp_rank * per:(par.dp_rank + 1) * per]
        share = share.to(par.device)
        start = time.perf_counter()
        with autocast:
            par.forward_backward(model, share[:, :-1], share[:, 1:])
        par.clip_grad_norm(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        par.barrier()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = sum(times[args.warmup:])
    if par.is_main:
        Path(args.out).write_text(json.dumps({
            "strategy": par.name, "world_size": par.world_size, "device": str(par.device),
            "tokens_per_s": args.steps * global_batch * args.seq / timed}))
    if args.parallel != "none":
        par.shutdown()


def measure(parallel: str, nproc: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        common = [__file__, "--worker", "--parallel", parallel, "--out", str(out), "--preset", args.preset,
                  "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                  "--warmup", str(args.warmup)]
        cmd = [sys.executable, *common] if parallel == "none" else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *common]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads_per_process)}
        subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=8, help="sequences per data-parallel rank")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    # One thread per process: on a shared (oversubscribed) CPU, OpenMP's spinning threads
    # can make a 2-thread process ten times slower than a 1-thread one.
    parser.add_argument("--threads-per-process", type=int, default=1)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print(f"preset {args.preset}, seq {args.seq}, {args.batch} sequences per data-parallel rank, "
          f"{args.nproc} processes, {args.threads_per_process} CPU thread(s) per process")
    print(f"{'strategy':<10} {'global batch':>12} {'tokens/s':>10} {'vs 1 process, same global batch':>32}")
    baselines: dict[int, float] = {}
    for strategy in STRATEGIES:
        if args.nproc < 2 and strategy in ("pipeline", "fsdp+tp"):
            print(f"{strategy:<10} skipped: needs two processes or more")
            continue
        # ddp / fsdp split the batch over ranks (global = nproc x batch); pipeline and fsdp+tp
        # (tp over all ranks) share one batch of `batch` sequences.
        global_batch = args.batch * (args.nproc if strategy in ("ddp", "fsdp") else 1)
        if global_batch not in baselines:
            single = argparse.Namespace(**{**vars(args), "batch": global_batch})
            baselines[global_batch] = measure("none", 1, single)["tokens_per_s"]
            print(f"{'single':<10} {global_batch:>12} {baselines[global_batch]:>10.0f} {'1.00x':>32}")
        result = measure(strategy, args.nproc, args)
        ratio = result["tokens_per_s"] / baselines[global_batch]
        print(f"{strategy:<10} {global_batch:>12} {result['tokens_per_s']:>10.0f} {ratio:>31.2f}x")


if __name__ == "__main__":
    main()
