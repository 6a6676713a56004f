"""A tiny chat checkpoint for the engine's front ends (server, terminal chat)."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

from lmforge.engine import STOP_TOKENS


def tiny_chat_checkpoint(root: Path, name: str = "tiny-chat", n_layers: int = 2, context: int = 256):
    """(checkpoint directory, tokenizer, model) of a random model whose tokenizer has the chat
    tokens. Its stop tokens have a zero (tied) embedding: their logit is 0, never the greedy pick
    over a few hundred peaked logits, so greedy answers run to max_tokens."""
    from lmforge.checkpoint import save_model
    from lmforge.config import load_config
    from lmforge.model import Transformer
    from lmforge.tokenizer import train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = train_tokenizer([(stdlib / "textwrap.py").read_text(encoding="utf-8")], vocab_size=400, workers=1)
    tok.save(root / "tok")
    cfg = load_config(overrides=[f"model.vocab_size={tok.vocab_size}", "model.d_model=32",
                                 f"model.n_layers={n_layers}", "model.n_heads=4",
                                 f"model.max_seq_len={context}", "model.init_std=0.3"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():
        for token in STOP_TOKENS:
            model.embed_tokens.weight[tok.special_tokens[token]] = 0
    return save_model(model.eval(), cfg, root / name, tokenizer_dir=root / "tok"), tok, model.eval()
