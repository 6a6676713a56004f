"""`lmforge plan`: what training a model costs, before spending it; and `--auto-size` for pretrain.

For a model (a preset, a config, or just a parameter count) it prints the parameters, the training
FLOPs per token, the memory per device, and the time to train on a Chinchilla-style token count
(Hoffmann et al. 2022: about 20 tokens per parameter for a compute-optimal run) at a stated
throughput (--tokens-per-s) or one measured on this machine with a few probe steps.

All arithmetic comes from lmforge/accounting.py. Parameter counts include the embeddings.

`auto_size` (pretrain --time-budget T --auto-size) measures the FLOP/s this machine reaches on the
configured model and picks the largest shape of `LADDER` whose Chinchilla budget,
20 x params x FLOPs-per-token, fits in the time (less a reserve for evaluation and start-up).
It assumes the FLOP/s stay the same across shapes, which is roughly right between neighbours.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import torch

from lmforge import accounting
from lmforge.config import ModelConfig, RunConfig, parse_duration
from lmforge.errors import UserError

TOKENS_PER_PARAM = 20
# Share of a time budget that --auto-size plans for training (the rest: evaluations, start-up).
_AUTO_SIZE_SHARE = 0.8
# Models above this size are not timed on this machine; pass --tokens-per-s.
_MAX_PROBE_PARAMS = 30_000_000

# (d_model, n_layers, n_heads) from tiny to 1B-class; key/value heads are half the query heads.
LADDER: list[tuple[int, int, int]] = [
    (64, 2, 2), (96, 3, 2), (128, 4, 4), (192, 4, 4), (256, 4, 4), (256, 6, 4), (384, 6, 6),
    (512, 8, 8), (640, 10, 10), (768, 12, 12), (1024, 16, 16), (1536, 20, 16), (2048, 24, 16),
]


def shaped(base: ModelConfig, d_model: int, n_layers: int, n_heads: int) -> ModelConfig:
    """`base` (vocabulary, context, architecture kept) with a ladder shape."""
    return dataclasses.replace(base, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                               n_kv_heads=max(1, n_heads // 2), d_ff=0)


def ladder(base: ModelConfig) -> list[ModelConfig]:
    return [shaped(base, *s) for s in LADDER]


def shape_for_params(base: ModelConfig, n_params: int) -> ModelConfig:
    """The ladder shape whose parameter count is closest (in ratio) to `n_params`."""
    import math

    return min(ladder(base), key=lambda m: abs(math.log(accounting.param_counts(m).total / n_params)))


def measure_tokens_per_s(cfg: RunConfig, steps: int = 4, device: str | None = None) -> float:
    """Training tokens/s of cfg's model on random tokens: forward, backward, AdamW step."""
    from lmforge.model import Transformer
    from lmforge.train.loop import autocast_for
    from lmforge.train.optim import build_optimizer

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"))
    seq_len = cfg.train.seq_len or cfg.model.max_seq_len
    model = Transformer(cfg.model).to(dev)
    opt = build_optimizer(model, cfg.train, dev)
    autocast = autocast_for(cfg, dev)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.batch_size, seq_len + 1), device=dev)

    def step() -> None:
        with autocast():
            loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # allocation and first-call costs
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return steps * cfg.train.batch_size * seq_len / (time.perf_counter() - start)


def auto_size(cfg: RunConfig, data_dir=None) -> RunConfig:
    """Replace cfg.model's shape by the largest ladder shape whose 20-tokens-per-param run fits."""
    budget = parse_duration(cfg.train.time_budget, "train.time_budget")
    seq_len = cfg.train.seq_len or cfg.model.max_seq_len
    flops_per_s = measure_tokens_per_s(cfg) * accounting.flops_per_token(cfg.model, seq_len)["training"]
    chosen = ladder(cfg.model)[0]
    for candidate in ladder(cfg.model):
        n = accounting.param_counts(candidate).total
        need = TOKENS_PER_PARAM * n * accounting.flops_per_token(candidate, seq_len)["training"]
        if need / flops_per_s <= budget * _AUTO_SIZE_SHARE:
            chosen = candidate
    cfg.model = chosen
    cfg.validate()
    n = accounting.param_counts(chosen).total
    print(f"auto-size: {accounting.human(flops_per_s, 'FLOP')}/s measured; chose d_model={chosen.d_model} "
          f"n_layers={chosen.n_layers} n_heads={chosen.n_heads} ({accounting.human(n)} params, "
          f"{accounting.human(TOKENS_PER_PARAM * n)} tokens)")
    return cfg


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def plan_text(cfg: RunConfig, tokens_per_s: float | None, source: str) -> str:
    m, t = cfg.model, cfg.train
    seq_len = t.seq_len or m.max_seq_len
    counts = accounting.param_counts(m)
    flops = accounting.flops_per_token(m, seq_len)
    cpu = accounting.training_memory(cfg, t.batch_size, seq_len, "cpu")
    gpu = accounting.training_memory(cfg, t.batch_size, seq_len, "cuda")
    tokens = TOKENS_PER_PARAM * counts.total
    B = lambda n: accounting.human(n, "B")  # noqa: E731
    lines = [
        f"model              {m.arch}: d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} "
        f"n_kv_heads={m.kv_heads} d_ff={m.ffn_dim} vocab={m.vocab_size} context={m.max_seq_len}",
        f"parameters         {accounting.human(counts.total)}  (embedding {accounting.human(counts.embedding)}, "
        f"attention {accounting.human(counts.attention)}, mlp {accounting.human(counts.mlp)}, "
        f"head {accounting.human(counts.head)})",
        f"FLOPs per token    {accounting.human(flops['training'], 'FLOP')} training "
        f"({accounting.human(flops['forward'], 'FLOP')} forward) at seq_len {seq_len}",
        f"memory per device  micro-batch {t.batch_size} x {seq_len}: weights {B(cpu['weights'])}, "
        f"grads {B(cpu['grads'])}, AdamW {B(cpu['adamw'])}, activations {B(cpu['activations'])} CPU "
        f"/ {B(gpu['activations'])} GPU",
        f"                   total {B(cpu['total'])} (CPU: {accounting.memory_mode(cfg, 'cpu')}) / {B(gpu['total'])} "
        f"(GPU: {accounting.memory_mode(cfg, 'cuda')})",
        f"Chinchilla tokens  {accounting.human(tokens)} ({TOKENS_PER_PARAM} per parameter) = "
        f"{tokens * flops['training']:.3g} FLOPs",
    ]
    if tokens_per_s:
        lines.append(f"throughput         {tokens_per_s:,.0f} tokens/s ({source})")
        lines.append(f"time to train      {duration(tokens / tokens_per_s)}")
    else:
        lines.append(f"time to train      unknown: {source}; pass --tokens-per-s")
    return "\n".join(lines)


def plan_args(parser: argparse.ArgumentParser) -> None:
    from lmforge.cli import add_config_args, finite_float

    add_config_args(parser)
    parser.add_argument("--params", metavar="N",
                        help="plan for a model of about N parameters (e.g. 20M, 1.3B) from the shape ladder")
    parser.add_argument("--tokens-per-s", type=finite_float, metavar="X",
                        help="training throughput to assume; default: measured here with a few steps")
    from lmforge.distributed.memory import add_plan_args

    add_plan_args(parser)  # --parallel / --world-size / --gpu-mem


def parse_count(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbBgG]?)\s*", text)
    if not m:
        raise UserError(f"--params {text!r}: expected a count like 20M, 1.3B or 500000")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    n = int(float(m.group(1)) * scale)
    if n <= 0:
        raise UserError(f"--params {text!r} must be positive")
    return n


def plan_command(args: argparse.Namespace) -> int:
    from lmforge.cli import config_from_args

    cfg = config_from_args(args)
    if args.params:
        cfg.model = shape_for_params(cfg.model, parse_count(args.params))
        cfg.validate()
    from lmforge.distributed.memory import plan_report

    parallel = plan_report(cfg, args)  # memory per device by strategy, if asked (checks flags early)
    if args.tokens_per_s is not None:
        if args.tokens_per_s <= 0:
            raise UserError("--tokens-per-s must be > 0")
        rate, source = args.tokens_per_s, "stated"
    elif accounting.param_counts(cfg.model).total <= _MAX_PROBE_PARAMS:
        rate = measure_tokens_per_s(cfg)
        where = torch.cuda.get_device_name() if torch.cuda.is_available() else "this CPU"
        source = f"measured on {where}, micro-batch {cfg.train.batch_size}"
    else:
        rate, source = None, f"too large to time here (> {accounting.human(_MAX_PROBE_PARAMS)} parameters)"
    print(plan_text(cfg, rate, source))
    if parallel:
        print(f"\n{parallel}")
    return 0
