"""Handlers for the foundation commands: `config show`, `init`, `model info`."""

from __future__ import annotations

import argparse
import os

from lmforge.cli import add_config_args, config_from_args, positive_int
from lmforge.config import ModelConfig, RunConfig
from lmforge.outputs import add_force_arg


def config_show_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)


def config_show(args: argparse.Namespace) -> int:
    print(config_from_args(args).to_toml(), end="")
    return 0


def init_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser, preset_required=True)
    parser.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to write")
    add_force_arg(parser)


def init(args: argparse.Namespace) -> int:
    from lmforge.outputs import check_output

    # Check the cheap things first, before importing torch and building the model.
    cfg = config_from_args(args)
    check_output(args.out, args.force)

    check_fits_in_memory(cfg.model, "init")

    import torch

    from lmforge.accounting import human
    from lmforge.checkpoint import save_model
    from lmforge.model import Transformer

    torch.manual_seed(cfg.train.seed)
    model = Transformer(cfg.model)
    out = save_model(model, cfg, args.out, overwrite=True)  # checked above
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out}: {human(n)} parameters, seed {cfg.train.seed}")
    return 0


def available_memory_bytes() -> int | None:
    """Memory the OS can give this process now (Linux MemAvailable; else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits_in_memory(m: ModelConfig, what: str) -> None:
    """Refuse, before allocating, a model whose fp32 weights alone exceed the memory available:
    one line with the size it needs instead of an allocator error after a long wait."""
    from lmforge.accounting import human, param_counts
    from lmforge.errors import UserError

    n = param_counts(m).total
    need = 4 * n
    have = available_memory_bytes()
    if have is not None and need > have:
        raise UserError(f"{what}: the model has {human(n)} parameters and needs {human(need, 'B')} for its "
                        f"fp32 weights alone, but {human(have, 'B')} of memory is available "
                        "(check model.vocab_size, d_model, n_layers)")


def model_info_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--checkpoint", metavar="DIR", help="read the model config of a checkpoint instead")
    parser.add_argument("--batch-size", type=positive_int, metavar="B", help="sequences per batch (default: train.batch_size)")
    parser.add_argument("--seq-len", type=positive_int, metavar="T",
                        help="tokens per sequence (default: train.seq_len, else model.max_seq_len)")


def model_info(args: argparse.Namespace) -> int:
    from lmforge.errors import UserError

    if args.checkpoint:
        if args.preset or args.config or args.overrides:
            raise UserError("give either --checkpoint or --preset/--config/--set, not both")
        from lmforge.checkpoint import read_config

        cfg = read_config(args.checkpoint)
    else:
        cfg = config_from_args(args)
    batch = args.batch_size if args.batch_size is not None else cfg.train.batch_size
    seq = args.seq_len if args.seq_len is not None else (cfg.train.seq_len or cfg.model.max_seq_len)
    if seq > cfg.model.max_seq_len:
        raise UserError(f"--seq-len={seq} exceeds the model's context, model.max_seq_len={cfg.model.max_seq_len}")
    print(format_model_info(cfg, batch, seq))
    return 0


def format_model_info(cfg: RunConfig, batch: int, seq: int) -> str:
    """A readable table: shape, parameters by group, FLOPs per token, training memory."""
    from lmforge.accounting import (
        flops_per_token,
        human,
        memory_mode,
        param_counts,
        training_memory,
    )

    m = cfg.model
    counts = param_counts(m).as_dict()
    total = counts["total"]
    kv = "MHA" if m.kv_heads == m.n_heads else ("MQA" if m.kv_heads == 1 else "GQA")
    lines = [
        f"model        {m.arch}: {m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads x {m.head_dim} "
        f"({m.kv_heads} kv heads, {kv}), d_ff {m.ffn_dim}, vocab {m.vocab_size}, context {m.max_seq_len}",
        f"             tied embeddings: {'yes' if m.tie_embeddings else 'no'}, qk_norm: {'yes' if m.qk_norm else 'no'}",
        "",
        f"{'parameters':<14}{'count':>16}{'share':>9}",
    ]
    for group, n in counts.items():
        if group == "total":
            lines.append(f"{'total':<14}{n:>16,}{'':>9}  ({human(n)})")
        else:
            note = "  (tied to embedding)" if group == "head" and m.tie_embeddings else ""
            lines.append(f"{group:<14}{n:>16,}{n / total:>8.1%}{note}")
    flops = flops_per_token(m, seq)
    lines += [
        "",
        f"FLOPs per token at seq_len {seq}: forward {human(flops['forward'], 'FLOP')}, "
        f"training {human(flops['training'], 'FLOP')} (6N + attention, PaLM accounting)",
        "",
        f"{f'training memory, batch {batch} x seq {seq}':<38}{'CPU':>12}{'GPU':>14}",
    ]
    mem = {device: training_memory(cfg, batch, seq, device) for device in ("cpu", "cuda")}
    for key, label in (("weights", "weights"), ("grads", "gradients"), ("adamw", "AdamW state"),
                       ("activations", "activations"), ("total", "total")):
        lines.append(f"{label:<38}{human(mem['cpu'][key], 'B'):>12}{human(mem['cuda'][key], 'B'):>14}")
    lines.append(f"(CPU: {memory_mode(cfg, 'cpu')}; GPU: {memory_mode(cfg, 'cuda')}; weights, gradients "
                 "and AdamW state are fp32 master copies under autocast too)")
    return "\n".join(lines)
