"""Supervised fine-tuning: conversations -> a chat model, one objective on the shared loop.

`SFTObjective` supplies the batches (rendered conversations, bucketed by length, right-padded,
targets -100 outside the assistant turns: lmforge/finetune/data.py) and the loss (next-token
cross-entropy on the assistant tokens and their <|end|> only), and the validation loss on the
assistant tokens of the held-out split. Accumulation, the guard, the time budget, checkpoints,
exact resume and signals are the loop's (lmforge/train/loop.py).

The model starts from a base checkpoint, whose model config the run keeps (fine-tuning never
changes the architecture). With `lora.rank` > 0 the base is frozen and only adapters train; the
run's checkpoints then hold the adapters and the base's path and hash (a LoRA checkpoint,
lmforge/finetune/lora.py), which `lmforge.load_model` reads as the base with the adapters merged.
The run directory records the base in `base.json` ({"checkpoint", "sha256"}); a resumed run
rebuilds its model from that base, after checking the hash.
"""

from __future__ import annotations

import collections
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.atomic import atomic_write_json, atomic_write_text
from lmforge.config import RunConfig
from lmforge.errors import UserError
from lmforge.finetune.data import SftData, bucket_batches, collate, render_examples, text_examples
from lmforge.finetune.lora import BaseRef
from lmforge.model import loss_positions
from lmforge.train.loop import Autocast, Objective, TrainLoop, TrainResult, seed_everything

# What `lmforge sft` starts from before --preset / --config / --set: fine-tuning moves a trained
# model a little, so a lower learning rate than pre-training's, a short warmup, a few hundred
# steps, no weight decay (it would pull the weights towards zero, away from the base) and frequent
# evaluation. lr: half the tiny preset's pre-training peak; measured on the README's tiny run
# (benchmarks/RESULTS.md, "SFT with the calculator"), 3e-4 learned several times slower in the
# same time and 3e-3 or more spiked or diverged. Models of 100M+ parameters want far less (1e-4).
SFT_TRAIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=300, batch_size=16, lr=1.5e-3, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0,
    eval_every=50, eval_batches=20, checkpoint_every=100, sample_every=0,
)
# The spike guard's spread floors for SFT: batches are bucketed by length, so one batch holds long
# corpus answers (loss ~4-5 nats) and the next short arithmetic (~1, falling towards 0): with
# pre-training's floors (2% of the median, 0.05 nats) such batches were spikes - on the tiny run
# five rollbacks at ordinary gradient norms (1.1-1.3, the run's median 1.1) ended a healthy run as
# "diverging", and a floor of half the median alone did the same once the easy batches' median fell
# to ~1.2. A spike must now stand 6 nats (or 3x the median) above the median: NaNs and blow-ups are
# still caught.
SFT_GUARD_DEFAULTS: dict[str, Any] = dict(min_rel_spread=0.5, min_abs_spread=1.0)
BASE_RECORD = "base.json"  # RUN_DIR/base.json: the base checkpoint and the sha256 of its weights


class SFTObjective(Objective):
    """Conversations as padded rows; loss on the assistant tokens only (targets -100 elsewhere).

    The data position is (epoch, batch index): each epoch orders the length buckets with the
    seed train.seed + epoch, so a resumed run draws the very batches it would have."""

    def __init__(self, cfg: RunConfig, data: SftData, tokenizer: Any, par: Any) -> None:
        from lmforge.train.pretrain import batch_geometry

        self.train, self.device = cfg.train, par.device
        self.rank, self.dp = par.dp_rank, par.dp_size
        context, self.accum, _ = batch_geometry(cfg, par.dp_size)
        self.examples, self.stats = render_examples(tokenizer, data.train, context, cfg.sft.overlong)
        self.val_examples, _ = render_examples(tokenizer, data.val, context, cfg.sft.overlong)
        self.text_rows = 0
        for source in data.text:  # pre-training text beside the conversations (text:SHARDS)
            rows = text_examples(source, "train", context, tokenizer, cfg.train.seed)
            self.text_rows += len(rows)
            self.examples += rows
            self.val_examples += text_examples(source, "val", context, tokenizer, cfg.train.seed,
                                               count=max(1, round(cfg.sft.val_fraction * len(rows))))
        if len(self.examples) < self.dp:
            raise UserError(f"sft: {len(self.examples)} training conversations fit the context of "
                            f"{context} tokens; need at least {self.dp}")
        self.pad_id = tokenizer.pad_id
        self.epoch, self.index = 0, 0
        self._batches: list[list[int]] | None = None
        self._recent: collections.deque[int] = collections.deque(maxlen=self.accum)
        self.loss_options: dict[str, Any] = {}

    @property
    def tokens_per_step(self) -> int:  # type: ignore[override]
        """Tokens (all ranks, padding excluded) of the micro-batches of the latest step."""
        return sum(self._recent)

    def attach(self, model: nn.Module, par: Any) -> None:
        from lmforge.train.pretrain import loss_options

        self.loss_options = loss_options(model, self.train, self.device)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What apply_lora left trainable: everything (full fine-tuning) or the adapters."""
        return [p for p in model.parameters() if p.requires_grad]

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            # A global batch is batch_size rows per rank; every rank needs at least one.
            batches = bucket_batches(self.examples, self.train.batch_size * self.dp, self.train.seed + self.epoch)
            self._batches = [b for b in batches if len(b) >= self.dp]
        return self._batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, positions of the assistant targets) of this rank's next rows."""
        if self.index >= len(self._epoch_batches()):
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        batch = self._epoch_batches()[self.index]
        self.index += 1
        self._recent.append(sum(len(self.examples[i][0]) - 1 for i in batch))
        return self._on_device([self.examples[i] for i in batch[self.rank::self.dp]])

    def _on_device(self, examples: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The positions are found on the host, where the targets are made: no device sync.
        x, y = collate(examples, self.pad_id)
        return x.to(self.device), y.to(self.device), loss_positions(y).to(self.device)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The mean cross-entropy over the assistant targets; the LM head and softmax run at
        those positions only (about half of builtin:chat's tokens), not over the prompts."""
        x, y, positions = batch
        return model.loss(x, y, positions=positions, **self.loss_options)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, par: Any, autocast: Autocast) -> dict[str, float]:
        """Mean loss over the assistant tokens of the held-out conversations (the same
        train.eval_batches batches every time)."""
        if not self.val_examples:
            return {}
        batches = bucket_batches(self.val_examples, self.train.batch_size, seed=0)[: self.train.eval_batches]
        was_training = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, assistant tokens
        for batch in batches[self.rank::self.dp]:
            x, y, positions = self._on_device([self.val_examples[i] for i in batch])
            with autocast():  # the losses of the assistant targets alone, (N,)
                per_token = par.evaluate(model, x, y, positions=positions).double()
            totals += torch.stack([per_token.sum(), per_token.new_tensor(len(positions))])
        model.train(was_training)
        totals = par.all_reduce(totals, "sum")
        return {"val_loss": float(totals[0] / totals[1].clamp(min=1))}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._batches = int(state["epoch"]), int(state["index"]), None


def read_base_record(run_dir: Path) -> BaseRef:
    """The base checkpoint a run recorded when it started."""
    file = Path(run_dir) / BASE_RECORD
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        return BaseRef(Path(meta["checkpoint"]), str(meta["sha256"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{file}: not a readable base record ({type(e).__name__}: {e}); "
                        "is this an `lmforge sft` run directory?") from None


def chat_tokenizer(base: BaseRef, stage: str) -> tuple[Any, Path]:
    """The base checkpoint's tokenizer (with the chat tokens) and its directory."""
    from lmforge.chat import require_chat_tokens
    from lmforge.tokenizer import load_tokenizer

    directory = base.checkpoint / "tokenizer"
    if not directory.is_dir():
        raise UserError(f"base checkpoint {base.checkpoint} has no tokenizer/ directory; {stage} renders "
                        "text with the model's tokenizer")
    tokenizer = load_tokenizer(directory)
    require_chat_tokens(tokenizer, f"the tokenizer of {base.checkpoint}")
    return tokenizer, directory


def load_base(base: BaseRef, cfg: RunConfig) -> nn.Module:
    """The base model, prepared for training per cfg.lora (seed torch first: LoRA's A is random)."""
    from lmforge.checkpoint import load_model
    from lmforge.finetune.lora import apply_lora

    model = load_model(base.checkpoint)
    return apply_lora(model, cfg.lora).train()


def lora_writer(model: nn.Module, base: BaseRef, cfg: RunConfig) -> Callable[..., None] | None:
    """TrainLoop's `write_weights` for a fine-tuning run: with LoRA a checkpoint holds the adapters
    alone (and the base's reference); None (the whole model) otherwise."""
    if not cfg.lora.rank:
        return None
    from lmforge.finetune.lora import write_lora_files

    def write_adapters(state: dict, ckpt_cfg: RunConfig, directory: Path, tok: Path | None) -> None:
        write_lora_files(model, ckpt_cfg, directory, base, tok)

    return write_adapters


def run_recorded(loop: TrainLoop, cfg: RunConfig, base: BaseRef, run_dir: Path, par: Any, lines: list[str],
                 report: Callable[[str], None], before: Callable[[], None] | None = None) -> TrainResult:
    """Train a fine-tuning stage (SFT, DPO, reward model, GRPO): on the main rank the lines a user
    sees first, then the base record and the config that --resume and later stages read; `before`
    (every rank) just before the loop; all ranks meet when it ends."""
    if par.is_main:
        for line in lines:
            report(line)
        atomic_write_json(run_dir / BASE_RECORD, base.to_json())
        atomic_write_text(run_dir / "config.toml", cfg.to_toml())
    if before is not None:
        before()
    result = loop.run()
    par.barrier()
    return result


def sft(cfg: RunConfig, base: BaseRef, data: SftData, run_dir: str | Path, resume_from: Path | None = None,
        time_budget_s: float | None = None, par: Any = None,
        clock: Callable[[], float] = time.perf_counter,
        report: Callable[[str], None] = print) -> TrainResult:
    """Fine-tune the base checkpoint on `data`, writing metrics and checkpoints into `run_dir`.
    `report` gets the lines a user sees before training (trainable share, data counts)."""
    from lmforge.distributed import init_parallel
    from lmforge.finetune.lora import describe_trainable

    run_dir = Path(run_dir)
    tokenizer, tokenizer_dir = chat_tokenizer(base, "SFT")
    owns_par = par is None
    par = par or init_parallel(cfg)
    try:
        seed_everything(cfg.train.seed)
        model = load_base(base, cfg)
        objective = SFTObjective(cfg, data, tokenizer, par)

        loop = TrainLoop(objective, model, cfg, run_dir, par, resume_from=resume_from,
                         time_budget_s=time_budget_s, clock=clock, tokenizer_dir=tokenizer_dir,
                         write_weights=lora_writer(model, base, cfg))
        kind = f"LoRA rank {cfg.lora.rank} on {','.join(cfg.lora.targets)}" if cfg.lora.rank else "full fine-tuning"
        return run_recorded(loop, cfg, base, run_dir, par, [
            f"sft: {kind}: {describe_trainable(model)}",
            f"sft: {len(data.train)} training and {len(data.val)} held-out conversations; "
            f"{objective.stats.describe()}"
            + (f"; {data.skipped} malformed records skipped" if data.skipped else "")
            + (f"; {objective.text_rows} rows of pre-training text" if data.text else "")], report)
    finally:
        if owns_par:
            par.shutdown()


__all__ = ["BASE_RECORD", "SFT_GUARD_DEFAULTS", "SFT_TRAIN_DEFAULTS", "SFTObjective", "load_base", "lora_writer",
           "read_base_record", "run_recorded", "sft"]
