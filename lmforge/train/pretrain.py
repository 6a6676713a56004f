"""The pre-training loop: next-token prediction over token shards, watched, resumable, self-healing.

One optimizer step, in order:

    1. learning rate  = schedule(step) x guard's cooldown factor          (schedule.py, guard.py)
    2. accumulate     = `accum` micro-batches through par.forward_backward (gradients summed, scaled)
    3. measure        = global gradient norm, clipped                     (par.clip_grad_norm)
    4. judge          = loss and norm finite, loss not a spike            (guard.py; agreed by all ranks)
         bad  -> never applied: roll back to the last checkpoint, skip the offending data, go on
         good -> optimizer.step()
    5. watch          = metrics line, validation loss/bpb, samples, checkpoint, signals

Everything parallel goes through the seam object `par` (lmforge.distributed); with one process it
is the model as it is. Checkpoints hold all state (train/checkpoint.py), so `--resume` continues
bit-exactly. SIGTERM/SIGINT finish the current step, write a checkpoint and exit cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.atomic import atomic_write_text
from lmforge.config import RunConfig, parse_duration
from lmforge.errors import ConfigError, UserError
from lmforge.eval.loss import evaluate_loss, token_byte_lengths
from lmforge.train.checkpoint import (
    CheckpointManager,
    TrainingCheckpoint,
    load_shards,
    read_checkpoint,
    restore_rng,
)
from lmforge.train.guard import FaultInjector, LossGuard
from lmforge.train.metrics import MetricsLogger, memory_gb, peak_flops
from lmforge.train.optim import build_optimizer, set_learning_rate
from lmforge.train.schedule import decay_progress, lr_multiplier, wsd_decay_start

# Share of a time budget kept free for the final evaluation and checkpoint until their cost has
# been measured (then twice the measured cost, see Trainer._reserve_s).
_BUDGET_RESERVE = 0.05
# Steps left out of the speed measurement: the first ones pay allocation and compilation.
_UNTIMED_STEPS = 2
# Shares of a time budget at which max_steps is estimated again from the speed since the
# previous estimate (a shared machine changes speed, both ways).
_RESIZE_AT = (0.25, 0.5, 0.75, 0.9)


@dataclass
class TrainResult:
    """What a finished (or stopped) run reports back."""

    step: int
    max_steps: int
    tokens: int
    loss: float | None
    val_loss: float | None
    val_bpb: float | None
    checkpoint: Path | None
    stopped_by_signal: bool = False


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


def autocast_for(cfg: RunConfig, device: torch.device):
    """bf16 autocast on GPU (or when asked), plain fp32 otherwise; returns a context factory."""
    if not cfg.train.uses_bf16(device.type):
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def run_compiled_code_eagerly():
    """A context in which compiled blocks run as plain eager code. Sampling calls them with a KV
    cache and new shapes at every token, each of which would be a recompilation (until dynamo's
    recompile limit, then eager anyway, after seconds of wasted compiling)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations during backward instead of storing them.

    The block's `forward` is wrapped in place, so parameter names (and checkpoints) are unchanged.
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.layers.values():
        inner = block.forward
        block.forward = lambda *args, _inner=inner, **kw: checkpoint(_inner, *args, use_reentrant=False, **kw)


def use_fused_loss(cfg: RunConfig, device: torch.device) -> bool:
    """train.fused_loss resolved: "auto" means on for CPU, where it was measured to pay."""
    return cfg.train.fused_loss == "on" or (cfg.train.fused_loss == "auto" and device.type == "cpu")


def prepare_for_training(model: nn.Module, cfg: RunConfig, device: torch.device) -> nn.Module:
    """Apply the training switches that work on the bare model, before any parallel wrapper:
    the fused loss, activation checkpointing and compiled blocks (and, on CUDA, TF32 for fp32
    matrix products, a process-wide setting). Returns the model."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if cfg.train.tf32 else "highest")
    model.fused_loss = use_fused_loss(cfg, device)
    if cfg.train.activation_checkpointing:
        apply_activation_checkpointing(model)
    if cfg.train.compile:
        compile_blocks(model)
    return model


def finish_for_training(model: nn.Module, cfg: RunConfig) -> nn.Module:
    """The training switches that apply after the parallel wrapper (to the bare model or stage
    it returned): with train.compile, the compiled head_loss. Returns the model."""
    if cfg.train.compile:
        compile_head_loss(model)
    return model


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged; one compiled graph reused by all)."""
    for block in model.layers.values():
        block.compile()


def compile_head_loss(model: nn.Module) -> None:
    """torch.compile the final norm + LM head + cross-entropy (`model.head_loss`) in place.

    As one graph the (B, T, vocab) logits and their softmax fuse. `model.loss` goes through
    `forward`, which calls `self.head_loss`, so the instance attribute set here is what training
    and evaluation run; parameters and names are untouched. A pipeline stage without the final
    norm never computes a loss, and the fused loss already does the head's work in one pass, so
    both are left alone.
    """
    if getattr(model, "norm", None) is None or getattr(model, "fused_loss", False):
        return
    model.head_loss = torch.compile(model.head_loss)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """One pre-training run; `run()` trains until max_steps, a signal, or the guard gives up."""

    def __init__(self, cfg: RunConfig, data_dir: Path, run_dir: Path, par: Any,
                 resume_from: Path | None = None, time_budget_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        from lmforge.data.loader import TokenLoader
        from lmforge.model import Transformer
        from lmforge.tokenizer import load_tokenizer

        self.clock = clock  # seconds; injectable so tests can drive the time budget
        self.t_start = clock()
        self.cfg, self.data_dir, self.run_dir, self.par = cfg, Path(data_dir), Path(run_dir), par
        self.device = par.device
        self.tokenizer_dir = self.data_dir / "tokenizer"
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the tokenizer in {self.tokenizer_dir} has {self.tokenizer.vocab_size} tokens but "
                f"model.vocab_size={cfg.model.vocab_size}; set model.vocab_size >= {self.tokenizer.vocab_size}"
            )
        self.seq_len, self.accum, self.tokens_per_step = batch_geometry(cfg, par.dp_size)
        self.max_steps = cfg.train.max_steps
        self.time_budget_s = time_budget_s
        self.sizings = 0  # times max_steps was (re)estimated from the measured speed
        self.end_costs: dict[str, float] = {}  # slowest evaluation / sample / checkpoint so far, s
        # (step, cosine progress there) from which the schedule walks to max_steps: set when
        # max_steps changes mid-run, so the learning rate goes on from where it was.
        self.schedule_anchor: tuple[int, float] | None = None

        seed_everything(cfg.train.seed)
        model = prepare_for_training(Transformer(cfg.model), cfg, self.device)
        # the bare model (or this rank's pipeline stage)
        self.model = finish_for_training(par.parallelize(model), cfg)
        self.optimizer = build_optimizer(self.model, cfg.train, self.device)
        self.autocast = autocast_for(cfg, self.device)

        self.loader = TokenLoader(self.data_dir, split="train", seq_len=self.seq_len,
                                  batch_size=cfg.train.batch_size * par.dp_size, shuffle=True,
                                  seed=cfg.train.seed, rank=par.dp_rank, world_size=par.dp_size,
                                  device=self.device)
        self.byte_lengths = token_byte_lengths(self.tokenizer, cfg.model.vocab_size).to(self.device)
        self.guard = LossGuard(cfg.guard)
        self.faults = FaultInjector(cfg.debug.inject)
        self.checkpoints = CheckpointManager(self.run_dir, cfg.train.keep_last)
        self.metrics = MetricsLogger(self.run_dir, enabled=par.is_main, tensorboard=cfg.train.tensorboard)
        self.peak = peak_flops(self.device)
        self.flops_per_token = _flops_per_token(cfg)

        self.step = 0
        self.tokens = 0
        self.last_loss: float | None = None
        self.last_val: dict[str, float] = {}
        self.stop_requested = False
        self.last_checkpoint: Path | None = None

        if par.is_main:
            self.checkpoints.remove_partial()
        if resume_from is not None:
            ckpt = read_checkpoint(resume_from)
            self._restore(ckpt, rollback=False)
            self.metrics.truncate_after(self.step)
            self.metrics.log({"step": self.step, "event": "resume", "checkpoint": str(resume_from)})
        else:
            if self.checkpoints.complete():
                raise UserError(f"{self.run_dir} already holds checkpoints; pass --resume to continue "
                                "that run, or choose a new --out")
            self.metrics.truncate_after(-1)
            # The starting point is a checkpoint too: the guard can roll back to it.
            self._save_checkpoint()

    # ---- the loop

    def run(self) -> TrainResult:
        cfg = self.cfg.train
        previous_handlers = self._install_signal_handlers()
        self.metrics.start_bar(self.max_steps, self.step)
        window_start, window_tokens = self.clock(), 0
        mark: tuple[float, int] | None = None  # (time, step) where the current speed measurement began
        try:
            while self.step < self.max_steps:
                step = self.step + 1
                loss, grad_norm, reason = self._attempt_step(step)
                if reason is not None:
                    self._roll_back(step, reason, loss, grad_norm)
                    mark = None  # steps went back: measure the speed afresh from here
                    continue
                self.step, self.tokens, self.last_loss = step, self.tokens + self.tokens_per_step, loss
                window_tokens += self.tokens_per_step
                now = self.clock()
                if mark is None:
                    if step >= _UNTIMED_STEPS:
                        mark = (now, step)
                elif self._agreed(self._sizing_due(now, step - mark[1])):
                    # The speed since the previous estimate, evaluations and checkpoints included;
                    # the slowest rank's, so every rank sizes the run alike.
                    seconds = torch.tensor((now - mark[0]) / (step - mark[1]), dtype=torch.float64)
                    self._size_to_budget(float(self.par.all_reduce(seconds, "max")))
                    mark = (now, step)
                if step % cfg.log_every == 0 or step == self.max_steps:
                    elapsed = max(now - window_start, 1e-9)
                    self._log_step(step, loss, grad_norm, window_tokens / elapsed)
                    window_start, window_tokens = self.clock(), 0
                self._watch(step)
                if self.stop_requested:
                    break
                if self._budget_exhausted():
                    self.metrics.log({"step": step, "event": "budget_exhausted"})
                    self.max_steps = step
                    self._watch(step, final=True)
                    break
        finally:
            self._restore_signal_handlers(previous_handlers)
            self.metrics.close()
            self.loader.close()
        if self.stop_requested:
            self.metrics.write(f"stopped by signal at step {self.step}; resume with --resume")
        return TrainResult(self.step, self.max_steps, self.tokens, self.last_loss,
                           self.last_val.get("val_loss"), self.last_val.get("val_bpb"),
                           self.last_checkpoint, self.stop_requested)

    def _attempt_step(self, step: int) -> tuple[float, float, str | None]:
        """Forward/backward over the micro-batches of `step`; apply it only if the guard agrees."""
        par = self.par
        for _ in range(self.guard.batches_to_skip(step) * self.accum):
            self.loader.next_batch()  # the data that caused a rollback here is left out
        if self.faults.due("sigkill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.faults.due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        factor = self.faults.loss_factor(step)
        losses = []
        for micro in range(self.accum):
            x, y = self.loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.autocast():
                micro_loss = par.forward_backward(self.model, x, y, loss_scale=factor / self.accum,
                                                  last_micro=micro == self.accum - 1)
            losses.append(micro_loss)
        loss = float(torch.stack(losses).mean()) * factor
        max_norm = self.cfg.train.grad_clip
        grad_norm = float(par.clip_grad_norm(self.model, max_norm if max_norm > 0 else 0.0))
        reason = self.guard.check(loss, grad_norm)
        # Every rank must take the same branch: a bad verdict anywhere is a bad verdict everywhere.
        if float(par.all_reduce(torch.tensor(float(reason is not None)), "max")) > 0 and reason is None:
            reason = "other_rank"
        if reason is not None:
            self.optimizer.zero_grad(set_to_none=True)
            return loss, grad_norm, reason
        set_learning_rate(self.optimizer, self._lr_multiplier(step))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.guard.observe(loss)
        return loss, grad_norm, None

    def _lr_multiplier(self, step: int) -> float:
        return (lr_multiplier(step, self.cfg.train, self.max_steps, self.schedule_anchor)
                * self.guard.lr_scale(step))

    def _roll_back(self, step: int, reason: str, loss: float, grad_norm: float) -> None:
        self.guard.rollback(step, reason)  # raises TrainingDiverged when out of rollbacks
        # The run's newest checkpoint, or the one it resumed from (a resume into a new --out).
        target = (self.checkpoints.latest() or self.last_checkpoint) if self.par.is_main else None
        target = self._broadcast_path(target)
        self.metrics.log({"step": step, "event": "rollback", "reason": reason, "loss": loss,
                          "grad_norm": grad_norm, "to_step": _step_of(target),
                          "rollbacks": self.guard.rollbacks})
        self.metrics.write(f"step {step}: {reason.replace('_', ' ')} (loss {loss:.4g}, grad norm "
                           f"{grad_norm:.4g}); rolled back to {target.name}, skipping its data")
        self._restore(read_checkpoint(target), rollback=True)

    # ---- watching

    def _log_step(self, step: int, loss: float, grad_norm: float, tokens_per_s: float) -> None:
        record: dict[str, Any] = {
            "step": step, "tokens": self.tokens, "loss": loss,
            "lr": self.cfg.train.lr * self._lr_multiplier(step), "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
        }
        if self.peak:
            # Every rank processes tokens_per_s / world_size of them against its own peak.
            record["mfu"] = tokens_per_s * self.flops_per_token / (self.peak * self.par.world_size)
        record["memory_gb"] = memory_gb(self.device)
        record["elapsed_s"] = self.clock() - self.t_start
        self.metrics.log(record)
        self.metrics.update_bar(step, self.max_steps, loss, tokens_per_s)

    def _watch(self, step: int, final: bool = False) -> None:
        cfg = self.cfg.train
        last = final or step >= self.max_steps
        if step % cfg.eval_every == 0 or last:
            with self._timed("eval"):
                self.last_val = self.evaluate()
            self.metrics.log({"step": step, **self.last_val})
            self.metrics.write(f"step {step}: val_loss {self.last_val['val_loss']:.4f}  "
                               f"val_bpb {self.last_val['val_bpb']:.4f}")
        if cfg.sample_every and (step % cfg.sample_every == 0 or last):
            with self._timed("sample"):
                text = self.sample()
            if text is not None:
                self.metrics.log({"step": step, "sample": text})
        if step % cfg.checkpoint_every == 0 or last or self.stop_requested:
            with self._timed("checkpoint"):
                self._save_checkpoint()

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Keep the slowest duration of `name` (end-of-run work the time budget must leave room for)."""
        start = self.clock()
        yield
        self.end_costs[name] = max(self.end_costs.get(name, 0.0), self.clock() - start)

    def evaluate(self) -> dict[str, float]:
        """Validation loss and bits per byte over the same `eval_batches` batches every time."""
        from lmforge.data.loader import TokenLoader

        val = TokenLoader(self.data_dir, split="val", seq_len=self.seq_len,
                          batch_size=self.cfg.train.batch_size * self.par.dp_size, shuffle=False,
                          seed=0, rank=self.par.dp_rank, world_size=self.par.dp_size,
                          device=self.device)
        # Never more than one pass over the split: a small split is not counted twice.
        n = min(self.cfg.train.eval_batches, val.windows_per_epoch // val.batch_size)
        batches = (tuple(t.to(self.device) for t in val.next_batch()) for _ in range(n))
        try:
            return evaluate_loss(self.model, batches, self.byte_lengths, self.autocast,
                                 all_reduce_sum=lambda t: self.par.all_reduce(t, "sum"),
                                 loss_fn=lambda x, y: self.par.evaluate(self.model, x, y))
        finally:
            val.close()

    def sample(self) -> str | None:
        """A short continuation of train.sample_prompt, or None where no rank has the whole model."""
        if self.par.world_size > 1 and self.par.name not in ("none", "ddp"):
            return None
        if not self.par.is_main:
            return None
        from lmforge.engine import generate_text

        cfg = self.cfg.train
        with self.autocast(), run_compiled_code_eagerly():
            generated = generate_text(self.model, self.tokenizer, cfg.sample_prompt, cfg.sample_tokens,
                                      temperature=0.8, top_k=50, seed=cfg.seed + self.step)
        return cfg.sample_prompt + generated.text

    # ---- time budget

    def _sizing_due(self, now: float, steps_measured: int) -> bool:
        """Size after a short measurement (3% of the budget, 2-60 s), then again at 25%, 50%, 75%
        and 90% of the budget, and whenever the steps are about to run out with time to spare
        (the machine got faster). A warmup-stable-decay run stops resizing once its decay has begun."""
        if self.time_budget_s is None or steps_measured < 3:
            return False
        elapsed = now - self.t_start
        if self.sizings == 0:
            return elapsed >= min(60.0, max(2.0, 0.03 * self.time_budget_s))
        if self.cfg.train.schedule == "wsd" and self.step >= wsd_decay_start(self.cfg.train, self.max_steps):
            return False
        ending_early = (self.max_steps - self.step <= max(1, self.max_steps // 50)
                        and elapsed < _RESIZE_AT[-1] * self.time_budget_s)
        scheduled = (self.sizings <= len(_RESIZE_AT)
                     and elapsed >= _RESIZE_AT[self.sizings - 1] * self.time_budget_s)
        return scheduled or ending_early

    def _agreed(self, flag: bool) -> bool:
        """True on every rank when it is true on any (decisions that change max_steps must agree)."""
        if self.time_budget_s is None:
            return False
        return bool(float(self.par.all_reduce(torch.tensor(float(flag)), "max")))

    def _size_to_budget(self, seconds_per_step: float) -> None:
        """Set max_steps so the run ends within the time budget, keeping the learning rate curve
        continuous: the cosine is anchored at the progress it has reached (never rescaled)."""
        cfg = self.cfg.train
        assert self.time_budget_s is not None
        if self.sizings == 0:
            # Measured before any evaluation: add its estimated share (a validation batch is a
            # forward pass, about a third of a training micro-batch). Later measurements include it.
            seconds_per_step *= 1 + cfg.eval_batches / (3 * self.accum) / cfg.eval_every
        remaining = self.time_budget_s - self._reserve_s() - (self.clock() - self.t_start)
        steps = self.step + max(1, int(remaining / seconds_per_step))
        # Each rank reads its own clock: take the smallest count so all stop at the same step.
        steps = -int(self.par.all_reduce(torch.tensor(-steps, dtype=torch.float64), "max"))
        if self.step > cfg.warmup_steps:
            done = decay_progress(self.step, cfg.warmup_steps, self.max_steps, self.schedule_anchor)
            self.schedule_anchor = (self.step, done)
        self.max_steps = cfg.max_steps = steps
        if self.sizings == 0 and cfg.warmup_steps > steps // 10:
            # A short budget should not spend most of its steps warming up: at most 10% of them.
            cfg.warmup_steps = max(1, steps // 10, self.step)
        self.sizings += 1
        self.metrics.log({"step": self.step, "event": "budget", "time_budget_s": self.time_budget_s,
                          "seconds_per_step": seconds_per_step, "max_steps": steps,
                          "warmup_steps": cfg.warmup_steps, "tokens_budget": steps * self.tokens_per_step})
        self.metrics.write(f"time budget {self.time_budget_s:.0f}s at {seconds_per_step:.3f}s/step: "
                           f"{steps} steps, {steps * self.tokens_per_step:,} tokens")

    def _budget_exhausted(self) -> bool:
        if self.time_budget_s is None or self.step >= self.max_steps:
            return False
        over = self.clock() - self.t_start > self.time_budget_s - self._reserve_s()
        return bool(float(self.par.all_reduce(torch.tensor(float(over)), "max")))

    def _reserve_s(self) -> float:
        """Time kept free for the final evaluation, sample and checkpoint: twice their slowest
        measured cost plus a second, at most 5% of the budget (and 5% until all were measured)."""
        assert self.time_budget_s is not None
        cap = self.time_budget_s * _BUDGET_RESERVE
        needed = ["eval", "checkpoint"] + (["sample"] if self.cfg.train.sample_every else [])
        if any(name not in self.end_costs for name in needed):
            return cap
        return min(cap, 1.0 + 2.0 * sum(self.end_costs[name] for name in needed))

    # ---- checkpoints

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "max_steps": self.max_steps,
            "scheduler": {"schedule": self.cfg.train.schedule, "max_steps": self.max_steps,
                          "anchor": self.schedule_anchor,
                          "lr_multiplier": self._lr_multiplier(self.step) if self.step else 0.0},
            "loader": self.loader.state_dict(),
            "guard": self.guard.state_dict(),
            "faults_fired": self.faults.state_dict(),
            "val_loss": self.last_val.get("val_loss"),
            "val_bpb": self.last_val.get("val_bpb"),
            "world_size": self.par.world_size,
        }

    def _save_checkpoint(self) -> None:
        if self.last_checkpoint is not None and _step_of(self.last_checkpoint) == self.step:
            return
        if self.cfg.train.checkpoint_format == "sharded":  # collective: every rank writes its shards
            self.cfg.train.max_steps = self.max_steps
            self.last_checkpoint = self.checkpoints.save_sharded(
                self.step, self.model, self.optimizer,
                die_midway=self.faults.due("sigkill_in_checkpoint", self.step),
                cfg=self.cfg, trainer_state=self.trainer_state(), tokenizer_dir=self.tokenizer_dir,
            )
            return
        model_state = self.par.full_state_dict(self.model)  # collective
        optimizer_state = self.par.optimizer_state_dict(self.model, self.optimizer)  # collective
        if self.par.is_main:
            self.cfg.train.max_steps = self.max_steps
            self.last_checkpoint = self.checkpoints.save(
                self.step, die_midway=self.faults.due("sigkill_in_checkpoint", self.step),
                cfg=self.cfg, model_state=model_state, optimizer_state=optimizer_state,
                trainer_state=self.trainer_state(), tokenizer_dir=self.tokenizer_dir,
            )
        else:
            self.last_checkpoint = self.checkpoints.root / f"step_{self.step:08d}"
        self.par.barrier()

    def _restore(self, ckpt: TrainingCheckpoint, rollback: bool) -> None:
        """Load a checkpoint into the live run. A rollback keeps the guard's and faults' history."""
        if ckpt.shards is not None:
            load_shards(ckpt.shards, self.par, self.model, self.optimizer)  # collective, resharding
        else:
            self.par.load_full_state_dict(self.model, {k: v.to(self.device) for k, v in ckpt.model.items()})
            self.par.load_optimizer_state_dict(self.model, self.optimizer, ckpt.optimizer)
        state = ckpt.trainer
        # max_steps stays as configured: a resumed run may be extended with --set train.max_steps.
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state["guard"], statistic_only=rollback)
        if not rollback:  # a rollback keeps the live schedule: its anchor line extends backwards
            anchor = state.get("scheduler", {}).get("anchor")
            self.schedule_anchor = (int(anchor[0]), float(anchor[1])) if anchor else None
            self.faults.load_state_dict(state["faults_fired"])
            if state.get("val_loss") is not None:
                self.last_val = {"val_loss": state["val_loss"], "val_bpb": state["val_bpb"]}
        restore_rng(ckpt.rng_tensors, state["rng"])
        self.last_checkpoint = ckpt.path

    def _broadcast_path(self, path: Path | None) -> Path:
        """All ranks roll back to the checkpoint the main rank names (shared filesystem)."""
        if self.par.world_size > 1:
            import torch.distributed as dist

            box = [str(path) if path else ""]
            dist.broadcast_object_list(box, src=0)
            path = Path(box[0]) if box[0] else None
        if path is None:
            raise UserError("the guard needs a checkpoint to roll back to, and none is complete")
        return path

    # ---- signals

    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum, frame):
            if self.stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            self.metrics.write(f"{signal.Signals(signum).name}: finishing step, then checkpointing")

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


def _flops_per_token(cfg: RunConfig) -> float:
    """Training FLOPs per token (forward + backward) from lmforge/accounting.py."""
    from lmforge import accounting

    return accounting.flops_per_token(cfg.model, cfg.train.seq_len or cfg.model.max_seq_len)["training"]


def pretrain(cfg: RunConfig, data_dir: str | Path, run_dir: str | Path, resume_from: Path | None = None,
             par: Any = None, clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Train `cfg` on the shards in `data_dir`, writing metrics and checkpoints into `run_dir`."""
    from lmforge.distributed import init_parallel

    data_dir, run_dir = Path(data_dir), Path(run_dir)
    _check_shards_dir(data_dir)
    owns_par = par is None
    par = par or init_parallel(cfg)
    try:
        # A resumed run already holds the max_steps its budget was sized to.
        budget = None
        if cfg.train.time_budget and resume_from is None:
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


__all__ = ["TrainResult", "Trainer", "batch_geometry", "pretrain"]

# DISTRIBUTED-SEAM-READY
