"""A model that says what it is told: after a scripted prompt, greedy decoding emits a scripted text.

`ScriptedModel` plugs into `lmforge.engine.Engine` like a `Transformer` (forward, hidden_states,
norm, head, cfg, one parameter). It keeps each row's token history in the generator's own KV
cache (token ids stored as layer 0's keys), so the engine's row moves, fan-out and compaction
carry the histories along exactly as they carry a real model's keys. At every position it looks
the history up: if it starts with a scripted prompt, the logits put (all but e^-100 of) the mass
on the next token of that prompt's script (then on <|endoftext|>); otherwise on <|endoftext|>.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch
from chat_fixtures import sequence_starts
from torch import nn

from lmforge.config import load_config


def code_tokenizer(root: Path, vocab_size: int = 400):
    """A small byte-level tokenizer (trained on stdlib code) with the default special tokens."""
    from lmforge.tokenizer import load_tokenizer, train_tokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = train_tokenizer([(stdlib / "textwrap.py").read_text(encoding="utf-8")], vocab_size=vocab_size,
                          workers=1, progress=False)
    tok.save(root / "tok")
    return load_tokenizer(root / "tok")


class ScriptedModel(nn.Module):
    def __init__(self, tokenizer, scripts: dict[tuple[int, ...], list[int]], context: int = 4096) -> None:
        super().__init__()
        self.cfg = load_config(overrides=[f"model.vocab_size={tokenizer.vocab_size}", "model.d_model=8",
                                          "model.n_layers=1", "model.n_heads=1",
                                          f"model.max_seq_len={context}"]).model
        self.scripts = scripts
        self.lengths = sorted({len(p) for p in scripts})
        self.eot = tokenizer.eot_id
        self.anchor = nn.Parameter(torch.zeros(1))  # the engine reads device and dtype from it
        self.norm = nn.Identity()

    def next_token(self, history: list[int]) -> int:
        for n in self.lengths:
            script = self.scripts.get(tuple(history[:n]))
            if script is not None:
                done = len(history) - n
                return script[done] if done < len(script) else self.eot
        return self.eot

    def hidden_states(self, idx: torch.Tensor, cache, rows: torch.Tensor | None = None) -> torch.Tensor:
        B, T = idx.shape
        if cache.ragged:  # the engine's batch: every row at its own position
            positions = cache.positions(T)
        else:  # a plain KVCache (lmforge.engine.generate): one position for all rows
            positions = (cache.pos + torch.arange(T)).expand(B, T)
        ids = idx[:, None, :, None].float().expand(B, self.cfg.kv_heads, T, self.cfg.head_dim)
        keys, _ = cache.update(0, ids.contiguous(), ids.contiguous())
        cache.advance(T)
        out = torch.zeros(B, T, self.cfg.vocab_size)
        history = keys[:, 0, :, 0].long().tolist()
        shortest = self.lengths[0] if self.lengths else 0
        starts = sequence_starts(cache, T)
        for b in range(B):
            for t in range(T):
                end = int(positions[b, t]) + 1
                # Before the shortest prompt's end no script can apply: skip the lookups.
                seen = history[b][starts[t]:starts[t] + end]
                out[b, t, self.next_token(seen) if end >= shortest else self.eot] = 100.0
        return out if rows is None else out.flatten(0, 1)[rows]

    def head(self, h: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return h

    def forward(self, idx: torch.Tensor, cache=None, last_only: bool = False) -> torch.Tensor:
        h = self.hidden_states(idx, cache)
        return h[:, -1:] if last_only else h


def scripted(tokenizer, pairs: list[tuple[list[int], str]], context: int = 4096) -> ScriptedModel:
    """A model that answers each prompt (token ids) with its text."""
    return ScriptedModel(tokenizer, {tuple(p): tokenizer.encode(text) for p, text in pairs}, context)
