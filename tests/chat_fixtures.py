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


def sequence_starts(cache, T: int) -> list[int]:
    """Where token t's own sequence starts in its row of the keys `cache.update` returned: 0, but
    the engine's packed prefill lays several prompts end to end in one row (its `bounds`)."""
    return [a for a, b in getattr(cache, "bounds", [(0, T)]) for _ in range(a, b)]


class ScriptedModel(torch.nn.Module):
    """A stand-in for a Transformer whose next token is `policy(token ids so far)`, for the engine.

    It keeps each row's tokens in the engine's own KV cache (the token id in the first key
    component), so the engine's prefill, row copies and compaction carry the history along as they
    carry a real model's keys. The logits are one-hot on the policy's choice: greedy decoding
    writes exactly what the policy says, wherever the engine samples rather than forces a token."""

    def __init__(self, vocab_size: int, policy, context: int = 256) -> None:
        from lmforge.config import load_config

        super().__init__()
        self.cfg = load_config(overrides=[f"model.vocab_size={vocab_size}", "model.d_model=8",
                                          "model.n_layers=1", "model.n_heads=1", "model.n_kv_heads=1",
                                          f"model.max_seq_len={context}"]).model
        self.policy = policy
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # the engine reads the device from it
        self.norm = torch.nn.Identity()

    def head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return h

    def hidden_states(self, idx: torch.Tensor, cache, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        positions = cache.positions(T)
        keys = torch.zeros(B, 1, T, self.cfg.head_dim)
        keys[:, 0, :, 0] = idx.float()
        history, _ = cache.update(0, keys, keys)  # (B, 1, positions so far, head_dim)
        out = torch.zeros(B, T, self.cfg.vocab_size)
        starts = sequence_starts(cache, T)
        for b in range(B):
            for t in range(T):
                seen = history[b, 0, starts[t]:starts[t] + int(positions[b, t]) + 1, 0].long().tolist()
                out[b, t, self.policy(seen)] = 1.0
        cache.advance(T)
        return out if rows is None else out.flatten(0, 1)[rows]

    def forward(self, idx: torch.Tensor, cache, last_only: bool = False) -> torch.Tensor:
        h = self.hidden_states(idx, cache)
        return h[:, -1:] if last_only else h
