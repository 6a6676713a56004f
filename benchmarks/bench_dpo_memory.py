"""Peak memory of a DPO training step vs an SFT step on the same batch (issue 17: DPO <= 1.3x).

The batch: `--pairs` preference pairs, i.e. 2 x pairs rows of `--seq-len` tokens (chosen rows, then
rejected rows, as `DPOObjective` builds them), the first half of each row a prompt (no loss). SFT
trains on the very same rows with its loss (next-token cross-entropy on the answer tokens, through
the fused head that `lmforge sft` uses on CPU). DPO computes each row's summed answer log-probability
through lmforge/align/head_logprobs.py and the sigmoid loss against cached reference values (random
numbers here: they are read from a file in a run, no model computes them). "dpo, plain head" is DPO
with the logits materialised (log-softmax of (tokens, vocab)), to show what the chunked head saves.

Each mode runs in a fresh process (the peak RSS is a high-water mark) with glibc's mmap threshold
fixed at 128 KiB (see bench_lora_memory.py); reported: the peak resident memory above the model's
weights during `--steps` full training steps (forward, backward, AdamW). With `--device cuda`:
the peak of `torch.cuda.max_memory_allocated` above the weights instead, under bf16 autocast, and
SFT's head as `lmforge sft` runs it there (not fused: `train.fused_loss=auto` is on for CPU only).

    OMP_NUM_THREADS=1 python benchmarks/bench_dpo_memory.py --preset tiny --pairs 8 --seq-len 256
    python benchmarks/bench_dpo_memory.py --preset gpt2-124m --pairs 8 --seq-len 512 --device cuda
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys

import torch

from lmforge.config import load_config
from lmforge.model import Transformer

MiB = 2**20
MODES = ("sft", "dpo", "dpo-plain")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def batch(cfg, pairs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.model.vocab_size, (2 * pairs, seq_len + 1), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[:, : seq_len // 2] = -100  # the prompt half: no loss
    return x, y


def step_loss(mode: str, model: Transformer, x: torch.Tensor, y: torch.Tensor,
              reference: torch.Tensor, fused: bool = True) -> torch.Tensor:
    from lmforge.align.dpo import answer_logprobs, preference_loss

    if mode == "sft":
        return model.loss(x, y, head_loss=functools.partial(model.head_loss, fused=fused))
    if mode == "dpo":
        logps, _ = answer_logprobs(model, x, y)
    else:  # the plain head: (tokens, vocab) logits and their log-softmax kept for backward
        logps = -model.loss(x, y, reduction="none").sum(-1)
    n = x.shape[0] // 2
    return preference_loss(logps[:n], logps[n:], reference[:n], reference[n:], beta=0.1).losses.mean()


def measure(args: argparse.Namespace) -> dict:
    cfg = load_config(preset=args.preset)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = Transformer(cfg.model).train().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x, y = (t.to(device) for t in batch(cfg, args.pairs, args.seq_len))
    reference = (-torch.rand(x.shape[0]) * 100).to(device)
    cuda = device.type == "cuda"
    baseline = torch.cuda.memory_allocated() if cuda else rss_bytes()
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=cuda and cfg.train.uses_bf16("cuda"))
    for _ in range(args.steps):
        with autocast:
            loss = step_loss(args.mode, model, x, y, reference, fused=cfg.train.uses_fused_loss(device.type))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": args.mode, "above_weights_mib": (peak - baseline) / MiB, "peak_rss_mib": peak / MiB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    rows = {mode: json.loads(subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], check=True,
                                            capture_output=True, text=True, env=env).stdout) for mode in MODES}
    where = "fp32 on CPU" if args.device == "cpu" else f"bf16 autocast on {args.device}"
    print(f"preset {args.preset}, {args.pairs} pairs = {2 * args.pairs} rows x {args.seq_len} tokens, {where}, "
          f"{args.steps} steps")
    total = "peak RSS" if args.device == "cpu" else "peak alloc"
    print(f"{'':<12}{'step peak above weights':>25}{total:>11}{'vs sft':>9}")
    sft = rows["sft"]["above_weights_mib"]
    for mode, r in rows.items():
        label = {"sft": "sft", "dpo": "dpo", "dpo-plain": "dpo, plain head"}[mode]
        print(f"{label:<16}{r['above_weights_mib']:>17.0f} MiB{r['peak_rss_mib']:>8.0f} MiB"
              f"{r['above_weights_mib'] / sft:>8.2f}x")


if __name__ == "__main__":
    main()
