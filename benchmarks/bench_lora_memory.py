"""Peak memory of a LoRA training step vs a full fine-tuning step, same model, same batch.

Each mode runs in a fresh process (peak resident memory is a high-water mark that cannot be
reset): build the model, take the resident set size (RSS) as the baseline, run `--steps`
training steps (forward, backward, fused AdamW on what trains), then report the peak RSS above
that baseline, i.e. what the steps added on top of the weights: gradients, optimizer state,
activations. Printed beside it, counted analytically: gradient and AdamW-state bytes of the
trainable parameters (4 + 8 bytes each in fp32).

The children run with glibc's MALLOC_MMAP_THRESHOLD_ fixed at 128 KiB: by default the threshold
grows as large blocks are freed, later tensors then come from the heap, and the peak RSS follows
the allocator's history (it measured the LoRA step above the full one) rather than the live
tensors. With the threshold fixed, every tensor of any size is its own mapping, returned on free.

    OMP_NUM_THREADS=1 python benchmarks/bench_lora_memory.py --preset small --batch-size 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from lmforge.config import load_config
from lmforge.finetune.lora import apply_lora, describe_trainable, trainable_parameters
from lmforge.model import Transformer
from lmforge.train.pretrain import loss_options

MiB = 2**20


def rss_bytes() -> int:
    """Current resident set size, from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(args: argparse.Namespace) -> dict:
    overrides = [f"lora.rank={args.rank if args.mode == 'lora' else 0}", f"lora.alpha={2 * args.rank}", *args.set]
    cfg = load_config(preset=args.preset, overrides=overrides)
    torch.manual_seed(0)
    model = apply_lora(Transformer(cfg.model), cfg.lora).train()
    # The head loss training uses (train.fused_loss="auto": fused on CPU, no (tokens, vocab) logits).
    options = loss_options(model, cfg.train, torch.device("cpu"))
    params = list(trainable_parameters(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (args.batch_size, args.seq_len + 1), generator=g)
               for _ in range(args.steps)]
    baseline = rss_bytes()
    for batch in batches:
        loss = model.loss(batch[:, :-1], batch[:, 1:], **options)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    trained = sum(p.numel() for p in params)
    return {"mode": args.mode, "trainable": describe_trainable(model),
            "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / MiB,
            "grads_adam_mib": trained * (4 + 8) / MiB,
            "step_peak_above_weights_mib": (peak - baseline) / MiB, "peak_rss_mib": peak / MiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", action="append", default=[],
                        help="a config override for both modes, e.g. train.activation_checkpointing=true")
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    rows = {}
    for mode in ("full", "lora"):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
        rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)
    print(f"{args.preset}, batch {args.batch_size} x {args.seq_len}, LoRA rank {args.rank} on all 7 "
          f"projections, fp32 on CPU, {args.steps} steps" + "".join(f", {o}" for o in args.set))
    print(f"{'':<6}{'weights':>10}{'grads+AdamW':>13}{'step peak':>11}{'peak RSS':>10}  trainable")
    for mode, r in rows.items():
        print(f"{mode:<6}{r['weights_mib']:>7.0f} MiB{r['grads_adam_mib']:>9.0f} MiB"
              f"{r['step_peak_above_weights_mib']:>7.0f} MiB{r['peak_rss_mib']:>6.0f} MiB  {r['trainable']}")
    ratio = rows["lora"]["step_peak_above_weights_mib"] / rows["full"]["step_peak_above_weights_mib"]
    total = rows["lora"]["peak_rss_mib"] / rows["full"]["peak_rss_mib"]
    print(f"LoRA / full: {ratio:.0%} of the step's memory above the weights, {total:.0%} of the peak RSS")


if __name__ == "__main__":
    main()
