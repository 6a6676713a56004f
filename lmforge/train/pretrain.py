"""Pre-training: next-token prediction over token shards, one objective on the shared loop.

`NextTokenObjective` supplies the batches (TokenLoader over the shards), the loss (the model's
cross-entropy, through the parallel strategy, with the fused or compiled head loss the objective
holds), validation loss / bits per byte and the periodic samples. Everything else (accumulation,
guard, budget, checkpoints, signals) is the loop's (train/loop.py); `Trainer` is that loop with
this objective, `pretrain()` the stage's entry point.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.atomic import atomic_write_text
from lmforge.config import RunConfig, TrainConfig, parse_duration
from lmforge.errors import ConfigError, UserError
from lmforge.eval.loss import evaluate_loss, token_byte_lengths
from lmforge.train.loop import (
    Autocast,
    Objective,
    TrainLoop,
    TrainResult,
    run_compiled_code_eagerly,
    seed_everything,
)


def batch_geometry(cfg: RunConfig, dp_size: int) -> tuple[int, int, int]:
    """(seq_len, micro-batches per step, tokens per step) for `dp_size` data-parallel ranks."""
    t = cfg.train
    seq_len = t.seq_len or cfg.model.max_seq_len
    per_micro = t.batch_size * seq_len * dp_size
    if not t.batch_tokens:
        return seq_len, 1, per_micro
    if t.batch_tokens % per_micro:
        raise ConfigError(
            f"train.batch_tokens={t.batch_tokens} must be a multiple of train.batch_size x seq_len x "
            f"data-parallel ranks = {t.batch_size} x {seq_len} x {dp_size} = {per_micro}"
        )
    return seq_len, t.batch_tokens // per_micro, t.batch_tokens


def loss_options(model: nn.Module, train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """What pre-training passes to `model.loss`: the head loss below and, with
    train.activation_checkpointing, checkpoint_blocks."""
    options: dict[str, Any] = {}
    head_loss = head_loss_for(model, train, device)
    if head_loss is not None:
        options["head_loss"] = head_loss
    if train.activation_checkpointing:
        options["checkpoint_blocks"] = True
    return options


def head_loss_for(model: nn.Module, train: TrainConfig, device: torch.device) -> Callable[..., torch.Tensor] | None:
    """The head loss the objective passes to `model.loss` (None: the model's own, plain).

    The fused loss (`train.fused_loss`) computes the LM head and cross-entropy a chunk at a time,
    with no (tokens, vocab) logits; with `train.compile` otherwise the final norm + head + loss
    run as one compiled graph (the logits and their softmax fuse). A pipeline stage without the
    final norm never computes a loss. The model itself is left as it is."""
    if getattr(model, "norm", None) is None:
        return None
    if train.uses_fused_loss(device.type):
        return functools.partial(model.head_loss, fused=True)
    if train.compile:
        return torch.compile(model.head_loss)
    return None


class NextTokenObjective(Objective):
    """Pre-training's objective: windows of the token shards, next-token cross-entropy."""

    def __init__(self, cfg: RunConfig, data_dir: Path, tokenizer: Any, par: Any) -> None:
        from lmforge.data.loader import TokenLoader

        self.train, self.data_dir, self.tokenizer, self.device = cfg.train, data_dir, tokenizer, par.device
        self.seq_len, self.accum, self.tokens_per_step = batch_geometry(cfg, par.dp_size)
        self.flops_per_token = _flops_per_token(cfg)
        self.loader = TokenLoader(data_dir, split="train", seq_len=self.seq_len,
                                  batch_size=cfg.train.batch_size * par.dp_size, shuffle=True,
                                  seed=cfg.train.seed, rank=par.dp_rank, world_size=par.dp_size,
                                  device=self.device)
        self.byte_lengths = token_byte_lengths(tokenizer, cfg.model.vocab_size).to(self.device)
        self.loss_options: dict[str, Any] = {}

    def attach(self, model: nn.Module, par: Any) -> None:
        self.loss_options = loss_options(model, self.train, self.device)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.loader.next_batch()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return model.loss(x, y, **self.loss_options)

    def forward_backward(self, par: Any, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                         loss_scale: float, last_micro: bool) -> torch.Tensor:
        # The strategy's own next-token path: pipeline parallelism computes this loss per stage.
        x, y = batch
        return par.forward_backward(model, x, y, loss_scale=loss_scale, last_micro=last_micro,
                                    **self.loss_options)

    def evaluate(self, model: nn.Module, par: Any, autocast: Autocast) -> dict[str, float]:
        """Validation loss and bits per byte over the same `eval_batches` batches every time."""
        from lmforge.data.loader import TokenLoader

        val = TokenLoader(self.data_dir, split="val", seq_len=self.seq_len,
                          batch_size=self.train.batch_size * par.dp_size, shuffle=False,
                          seed=0, rank=par.dp_rank, world_size=par.dp_size, device=self.device)
        # Never more than one pass over the split: a small split is not counted twice.
        n = min(self.train.eval_batches, val.windows_per_epoch // val.batch_size)
        batches = (tuple(t.to(self.device) for t in val.next_batch()) for _ in range(n))
        options = {k: v for k, v in self.loss_options.items() if k == "head_loss"}
        try:
            return evaluate_loss(model, batches, self.byte_lengths, autocast,
                                 all_reduce_sum=lambda t: par.all_reduce(t, "sum"),
                                 loss_fn=lambda x, y: par.evaluate(model, x, y, **options))
        finally:
            val.close()

    def sample(self, model: nn.Module, par: Any, autocast: Autocast, step: int) -> str | None:
        """A short continuation of train.sample_prompt, or None where no rank has the whole model."""
        if par.world_size > 1 and par.name not in ("none", "ddp"):
            return None
        if not par.is_main:
            return None
        from lmforge.engine import generate_text

        cfg = self.train
        with autocast(), run_compiled_code_eagerly():
            generated = generate_text(model, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                      temperature=0.8, top_k=50, seed=cfg.seed + step)
        return cfg.sample_prompt + generated.text

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()


class Trainer(TrainLoop):
    """One pre-training run: the shared loop with the next-token objective on a fresh model."""

    def __init__(self, cfg: RunConfig, data_dir: Path, run_dir: Path, par: Any,
                 resume_from: Path | None = None, time_budget_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        from lmforge.model import Transformer
        from lmforge.tokenizer import load_tokenizer

        data_dir = Path(data_dir)
        tokenizer_dir = data_dir / "tokenizer"
        tokenizer = load_tokenizer(tokenizer_dir)
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the tokenizer in {tokenizer_dir} has {tokenizer.vocab_size} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= {tokenizer.vocab_size}"
            )
        batch_geometry(cfg, par.dp_size)  # a bad geometry fails before the model is built
        seed_everything(cfg.train.seed)
        model = Transformer(cfg.model)
        objective = NextTokenObjective(cfg, data_dir, tokenizer, par)
        super().__init__(objective, model, cfg, run_dir, par, resume_from=resume_from,
                         time_budget_s=time_budget_s, clock=clock, tokenizer_dir=tokenizer_dir)


def _flops_per_token(cfg: RunConfig) -> float:
    """Training FLOPs per token (forward + backward) from lmforge/accounting.py."""
    from lmforge import accounting

    return accounting.flops_per_token(cfg.model, cfg.train.seq_len or cfg.model.max_seq_len)["training"]


def pretrain(cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, resume_from: Path | None = None,
             par: Any = None, clock: Callable[[], float] = time.perf_counter,
             time_budget_s: float | None = None) -> TrainResult:
    """Train `cfg` on the shards in `data_dir`, writing metrics and checkpoints into `run_dir`.
    `time_budget_s` (the lifecycle's split) overrides train.time_budget, on a resumed run too."""
    from lmforge.distributed import init_parallel

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    _check_shards_dir(data_dir)
    owns_par = par is None
    par = par or init_parallel(cfg)
    try:
        # A resumed run already holds the max_steps its budget was sized to.
        budget = time_budget_s
        if budget is None and cfg.train.time_budget and resume_from is None:
            budget = parse_duration(cfg.train.time_budget, "train.time_budget")
        trainer = Trainer(cfg, data_dir, run_dir, par, resume_from=resume_from, time_budget_s=budget,
                          clock=clock)
        if par.is_main:
            atomic_write_text(run_dir / "config.toml", cfg.to_toml())
        result = trainer.run()
        par.barrier()  # every rank is past its last collective before any tears the group down
        return result
    finally:
        # A process group left to interpreter exit can abort a rank ("terminate called without
        # an active exception") after a run that succeeded.
        if owns_par:
            par.shutdown()


def _check_shards_dir(data_dir: Path) -> None:
    if not data_dir.is_dir():
        raise UserError(f"--data: shards directory not found: {data_dir}")
    if not (data_dir / "manifest.json").is_file():
        raise UserError(f"--data: {data_dir} has no manifest.json; make it with `lmforge data prepare`")
    if not (data_dir / "tokenizer").is_dir():
        raise UserError(f"--data: {data_dir} has no tokenizer/ directory; make it with `lmforge data prepare`")
    with contextlib.suppress(OSError, ValueError):
        json.loads((data_dir / "manifest.json").read_text(encoding="utf-8"))
        return
    raise UserError(f"--data: {data_dir / 'manifest.json'} is not valid JSON")


__all__ = ["NextTokenObjective", "TrainResult", "Trainer", "batch_geometry", "head_loss_for", "loss_options", "pretrain"]

# DISTRIBUTED-SEAM-READY
