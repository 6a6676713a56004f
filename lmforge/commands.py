"""Handlers for the foundation commands: `config show`, `init`, `model info`."""

from __future__ import annotations

import argparse

from lmforge.cli import add_config_args, config_from_args
from lmforge.config import ModelConfig
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


def model_info_args(parser: argparse.ArgumentParser) -> None:
    add_config_args(parser)
    parser.add_argument("--checkpoint", metavar="DIR", help="read the model config of a checkpoint instead")
    parser.add_argument("--batch-size", type=int, metavar="B", help="sequences per batch (default: train.batch_size)")
    parser.add_argument("--seq-len", type=int, metavar="T",
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
    batch = args.batch_size or cfg.train.batch_size
    seq = args.seq_len or cfg.train.seq_len or cfg.model.max_seq_len
    if batch <= 0 or seq <= 0:
        raise UserError(f"--batch-size={batch} and --seq-len={seq} must be > 0")
    print(format_model_info(cfg.model, batch, seq))
    return 0


def format_model_info(m: ModelConfig, batch: int, seq: int) -> str:
    """A readable table: shape, parameters by group, FLOPs per token, training memory."""
    from lmforge.accounting import flops_per_token, human, memory_bytes, param_counts

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
        f"{f'memory, batch {batch} x seq {seq}':<28}{'fp32':>12}{'bf16':>12}",
    ]
    mem = {dtype: memory_bytes(m, batch, seq, dtype) for dtype in ("fp32", "bf16")}
    for key, label in (("weights", "weights"), ("grads", "gradients"), ("adamw", "AdamW state"),
                       ("activations", "activations"), ("total", "total")):
        lines.append(f"{label:<28}{human(mem['fp32'][key], 'B'):>12}{human(mem['bf16'][key], 'B'):>12}")
    return "\n".join(lines)
