"""Memory per device of each parallel strategy, and which strategies fit given devices.

Arithmetic only (lmforge/accounting.py gives the per-model figures), so `lmforge plan` answers
for a 7B model instantly. Figures are for the most loaded rank, in bytes:

    weights, grads, optimizer   fp32 master copies (AdamW: two moments); divided by the ranks
                                that shard them
    gathered                    FSDP only: parameters and gradients made whole for the unit being
                                computed (two blocks, with prefetch, and the root's embeddings/head)
    activations                 what backward keeps, for this rank's share of the batch, in the
                                compute dtype (bf16 on GPUs)

    none / ddp   everything whole on every rank; ddp adds nothing but communication
    fsdp         weights, grads and optimizer / W; activations as ddp
    fsdp+tp      block matrices / (W); the rest / (W / tp); activations inside attention and the
                 MLP / tp (the residual stream and the logits stay whole on every tp rank)
    pipeline     layers / S on each of S stages (train.pipeline_stages, default W), plus the
                 embeddings (first stage) or head (last stage); activations of the micro-batches
                 in flight: all of them (gpipe) or at most one per stage (1f1b)
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

import torch

from lmforge import accounting
from lmforge.config import RunConfig
from lmforge.errors import UserError

STRATEGIES = ("none", "ddp", "fsdp", "fsdp+tp", "pipeline")
FP32 = accounting.BYTES["fp32"]


@dataclass(frozen=True)
class DeviceMemory:
    """Bytes on the most loaded device under one strategy."""

    strategy: str
    world_size: int
    weights: int
    grads: int
    optimizer: int
    gathered: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.gathered + self.activations


def _final_norm(cfg: RunConfig) -> int:
    return (2 if cfg.model.arch == "gpt2" else 1) * cfg.model.d_model  # LayerNorm has a bias


def _layer_and_rest(cfg: RunConfig) -> tuple[int, int]:
    """Parameters of one block, and of everything outside the blocks."""
    counts = accounting.param_counts(cfg.model)
    layer_norms = (counts.norms - _final_norm(cfg)) // cfg.model.n_layers
    per_layer = (counts.attention + counts.mlp) // cfg.model.n_layers + layer_norms
    return per_layer, counts.total - per_layer * cfg.model.n_layers


def _activations(cfg: RunConfig, tokens: int, layers: int, dtype: str, tp: int = 1,
                 with_logits: bool = True) -> int:
    """Activation bytes for `tokens` tokens through `layers` blocks (+ final norm and logits)."""
    m = cfg.model
    seq_len = cfg.train.seq_len or m.max_seq_len
    total = accounting.activation_elements_per_token(m, seq_len, logits=False)
    outside = 2 * m.d_model  # final norm input
    per_layer = (total - outside) // m.n_layers
    replicated = 2 * m.d_model  # residual stream: the norms' inputs stay whole under TP
    per_layer = replicated + (per_layer - replicated) // tp
    b = accounting.BYTES[dtype]
    elements = layers * per_layer + (outside if with_logits else 0)
    logits_fp32 = m.vocab_size * FP32 if with_logits else 0  # the loss's fp32 log-softmax
    return tokens * (elements * b + logits_fp32)


def memory_per_device(cfg: RunConfig, strategy: str, world_size: int, dtype: str = "fp32") -> DeviceMemory:
    """Memory of the most loaded rank when `cfg` trains under `strategy` on `world_size` ranks.

    `dtype` is the compute dtype of activations ("bf16" with autocast / FSDP mixed precision).
    """
    from lmforge.distributed import check_layout

    if strategy not in STRATEGIES:
        raise UserError(f"--parallel {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    check_layout(cfg, strategy, world_size)
    m, t = cfg.model, cfg.train
    seq_len = t.seq_len or m.max_seq_len
    layer, rest = _layer_and_rest(cfg)
    n = layer * m.n_layers + rest
    adam = 2  # moments per parameter
    tokens = t.batch_size * seq_len  # per device and micro-batch (train.batch_size is per device)
    b = accounting.BYTES[dtype]
    if strategy in ("none", "ddp"):
        return DeviceMemory(strategy, world_size, n * FP32, n * FP32, adam * n * FP32, 0,
                            _activations(cfg, tokens, m.n_layers, dtype))
    if strategy == "fsdp":
        shard = -(-n // world_size)
        gathered = (2 * layer + rest) * (b + FP32)  # whole params (compute dtype) and their fp32 grads
        return DeviceMemory(strategy, world_size, shard * FP32, shard * FP32, adam * shard * FP32, gathered,
                            _activations(cfg, tokens, m.n_layers, dtype))
    if strategy == "fsdp+tp":
        tp = t.tp_size
        dp = world_size // tp
        shard = -(-(layer * m.n_layers) // world_size) + -(-rest // dp)
        gathered = (2 * layer // tp + rest) * (b + FP32)
        return DeviceMemory(strategy, world_size, shard * FP32, shard * FP32, adam * shard * FP32, gathered,
                            _activations(cfg, tokens, m.n_layers, dtype, tp=tp))
    # pipeline: the worst stage is the first (embeddings, most micro-batches in flight) or the last
    from lmforge.distributed.pipeline import pipeline_stages

    stages = pipeline_stages(cfg, world_size)  # the rest of world_size replicates the pipeline
    layers = m.n_layers // stages
    micro = t.pipeline_microbatches
    micro_tokens = tokens // micro
    in_flight = micro if t.pipeline_schedule == "gpipe" else min(stages, micro)
    counts = accounting.param_counts(m)
    # The last stage's head is its own matrix; with tied embeddings a copy of the embedding.
    head = counts.head or m.vocab_size * m.d_model
    first_params = layers * layer + (rest if stages == 1 else counts.embedding)
    last_params = layers * layer + _final_norm(cfg) + head
    worst = max(first_params, last_params)
    first_act = _activations(cfg, in_flight * micro_tokens, layers, dtype, with_logits=stages == 1)
    last_act = _activations(cfg, (micro if t.pipeline_schedule == "gpipe" else 1) * micro_tokens, layers, dtype)
    return DeviceMemory(strategy, world_size, worst * FP32, worst * FP32, adam * worst * FP32, 0,
                        max(first_act, last_act))


def parse_memory(text: str) -> int:
    """"80GB", "80G", "24GiB", "512MiB" -> bytes (GB and GiB both mean 2**30 here)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise UserError(f"--gpu-mem {text!r}: expected a size such as 80GB or 24GiB")
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def plan_strategies(cfg: RunConfig, world_size: int, device_bytes: int | None,
                    strategies: tuple[str, ...] = STRATEGIES, dtype: str = "fp32") -> str:
    """A table: per strategy, memory per device by kind, and whether it fits `device_bytes`."""
    h = accounting.human
    rows = [f"memory per device on {world_size} device(s), activations in {dtype}, "
            f"train.batch_size={cfg.train.batch_size} per device:"]
    rows.append(f"  {'strategy':<9} {'weights':>11} {'grads':>11} {'optimizer':>11} {'gathered':>11} "
                f"{'activations':>11} {'total':>11}  fits")
    for strategy in strategies:
        if world_size > 1 and strategy == "none":
            continue
        try:
            mem = memory_per_device(cfg, strategy, world_size, dtype)
        except UserError as e:
            rows.append(f"  {strategy:<9} not possible: {e}")
            continue
        fits = "-" if device_bytes is None else ("yes" if mem.total <= device_bytes else "no")
        rows.append(f"  {strategy:<9} " + " ".join(
            f"{h(v, 'B'):>11}" for v in (mem.weights, mem.grads, mem.optimizer, mem.gathered,
                                          mem.activations, mem.total)) + f"  {fits}")
    return "\n".join(rows)


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """`lmforge plan` flags for the parallel layout."""
    from lmforge.cli import positive_int

    group = parser.add_argument_group("parallel training")
    group.add_argument("--parallel", choices=STRATEGIES, metavar="STRATEGY",
                       help=f"show one strategy ({', '.join(STRATEGIES)}); default: all")
    group.add_argument("--world-size", type=positive_int, metavar="N", help="number of devices (processes)")
    group.add_argument("--gpu-mem", metavar="SIZE", help="memory of one device, e.g. 80GB: say which strategies fit")


def plan_report(cfg: RunConfig, args: argparse.Namespace) -> str | None:
    """The memory-per-device table `lmforge plan` prints when any parallel flag is given."""
    if args.parallel is None and args.world_size is None and args.gpu_mem is None:
        return None
    world_size = args.world_size if args.world_size is not None else 1
    device_bytes = parse_memory(args.gpu_mem) if args.gpu_mem else None
    # Activations in bf16 where the run would use autocast (GPUs), fp32 otherwise.
    gpu = device_bytes is not None or torch.cuda.is_available()
    dtype = "bf16" if cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and gpu) else "fp32"
    strategies = (args.parallel,) if args.parallel else STRATEGIES
    return plan_strategies(cfg, world_size, device_bytes, strategies, dtype)
