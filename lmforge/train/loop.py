"""The training loop every stage shares; a stage supplies an `Objective` (its batches and its loss).

One optimizer step, in order:

    1. learning rate  = schedule(step) x guard's cooldown factor          (schedule.py, guard.py)
    2. accumulate     = `accum` micro-batches: objective.forward_backward (gradients summed, scaled)
    3. measure        = global gradient norm, clipped                     (par.clip_grad_norm)
    4. judge          = loss and norm finite, loss not a spike            (guard.py; agreed by all ranks)
         bad  -> never applied: roll back to the last checkpoint, skip the offending data, go on
         good -> optimizer.step()
    5. watch          = metrics line, objective.evaluate (+ train.eval_tasks, lmforge/eval/training.py),
                        objective.sample, checkpoint, signals

What is the same for every stage lives here: accumulation, clipping, autocast, compiled blocks,
the parallel wrapper (`par`, lmforge.distributed), the spike/NaN guard with rollback, atomic
checkpoints with exact resume (train/checkpoint.py), sizing to a time budget, metrics JSONL /
TensorBoard / progress bar, and SIGTERM/SIGINT: finish the step, checkpoint, stop (a second signal
stops at once). What differs per stage is an `Objective`: pre-training's is in train/pretrain.py;
docs/ARCHITECTURE.md ("Training loop and objectives") shows how SFT, DPO, reward models and GRPO
plug in. The loop never patches the model: compiled or fused loss callables are the objective's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.atomic import atomic_write_json
from lmforge.checkpoint import SELECTED_FILE, read_selected
from lmforge.config import RunConfig, TrainConfig
from lmforge.errors import Interrupted, UserError
from lmforge.eval.training import training_eval
from lmforge.train.checkpoint import (
    CheckpointManager,
    TrainingCheckpoint,
    WeightsWriter,
    load_shards,
    read_checkpoint,
    restore_rng,
)
from lmforge.train.guard import FaultInjector, LossGuard
from lmforge.train.metrics import MetricsLogger, memory_gb, peak_flops
from lmforge.train.optim import build_optimizer, set_learning_rate
from lmforge.train.schedule import decay_progress, lr_multiplier, wsd_decay_start

# Share of a time budget kept free for the final evaluation and checkpoint until their cost has
# been measured (then twice the measured cost, see TrainLoop._reserve_s).
_BUDGET_RESERVE = 0.05
# Steps left out of the speed measurement: the first ones pay allocation and compilation.
_UNTIMED_STEPS = 2
# Shares of a time budget at which max_steps is estimated again from the speed since the
# previous estimate (a shared machine changes speed, both ways).
_RESIZE_AT = (0.25, 0.5, 0.75, 0.9)

Autocast = Callable[[], contextlib.AbstractContextManager]


@dataclasses.dataclass
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
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if any


class Objective:
    """What one training stage supplies to the loop: its batches and its loss.

    The loop calls, per optimizer step, `next_batch()` and `forward_backward(...)` once per
    micro-batch; at intervals `evaluate(...)` and `sample(...)`; and `state_dict()` /
    `load_state_dict()` with every checkpoint, so the data position resumes exactly. Override
    `loss` (any stage) or `forward_backward` (a stage the parallel strategies know specially, as
    pre-training's next-token loss is for pipeline parallelism).
    """

    #: tokens one optimizer step trains on (all ranks); counts `tokens` and sizes the budget
    tokens_per_step: int = 0
    #: micro-batches accumulated per optimizer step (from train.batch_tokens, see batch_geometry)
    accum: int = 1
    #: training FLOPs per token, for MFU in the metrics (0: not logged)
    flops_per_token: float = 0.0
    #: the most steps a time budget may size the run to (None: as many as fit): a fine-tuning
    #: objective's epochs over a fixed dataset, which a budget on a fast machine would multiply
    max_budget_steps: int | None = None
    #: a metric of `evaluate` (higher is better, e.g. held-out "pass_at_1") by which the run's result
    #: is chosen: measured at step 0 too, every new best is checkpointed and named in
    #: RUN_DIR/checkpoints/selected.json, which loading the run directory follows (None: the last)
    select_by: str | None = None

    def attach(self, model: nn.Module, par: Any) -> None:
        """Called once with the model as the parallel strategy returned it, before training:
        build compiled callables, cache reference log-probs, ... (never patch the model)."""

    def trainable_parameters(self, model: nn.Module) -> Iterable[nn.Parameter]:
        """The parameters the optimizer updates (all by default; LoRA: the adapters only). Called
        on the bare model before the parallel wrapper; the loop freezes all others."""
        return model.parameters()

    def next_batch(self) -> Any:
        """This rank's next micro-batch (any structure `loss` understands), on the device."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """The mean loss of one micro-batch; must call the model through its module call."""
        raise NotImplementedError

    def forward_backward(self, par: Any, model: nn.Module, batch: Any, loss_scale: float,
                         last_micro: bool) -> torch.Tensor:
        """Backward of loss * loss_scale through the parallel strategy; returns the detached
        loss averaged over ranks."""
        return par.backward(model, lambda m: self.loss(m, batch), loss_scale, last_micro)

    def evaluate(self, model: nn.Module, par: Any, autocast: Autocast) -> dict[str, float]:
        """Validation metrics, e.g. {"val_loss": ...}: logged, written, kept in checkpoints."""
        return {}

    def sample(self, model: nn.Module, par: Any, autocast: Autocast, step: int) -> str | None:
        """A short text to log at `train.sample_every` (None: nothing to show)."""
        return None

    def step_metrics(self) -> dict[str, float]:
        """Extra numbers for the metrics line of a logged step (e.g. DPO's reward margin)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Where the data stands (JSON-able), saved with every checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        """Release loaders and threads when the run ends."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def autocast_for(cfg: RunConfig, device: torch.device) -> Autocast:
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


def prepare_for_training(model: nn.Module, train: TrainConfig, device: torch.device) -> nn.Module:
    """What the loop does to the bare model before the parallel wrapper: with train.compile, each
    block compiled through nn.Module.compile (torch's own in-place API: names and forward
    unchanged); on CUDA, TF32 for fp32 matrix products (a process-wide setting); in a bf16 run, the
    frozen weights of linear layers (a LoRA base) held in bf16. Returns the model."""
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if train.tf32 else "highest")
    if train.uses_bf16(device.type):
        hold_frozen_linears_in_bf16(model)
    if train.compile:
        for block in model.layers.values():
            block.compile()
    return model


def hold_frozen_linears_in_bf16(model: nn.Module) -> int:
    """Cast the frozen weights of linear layers to bf16; returns how many. Autocast casts them to
    bf16 at every product anyway, so the results are the same bits, the base takes half the memory
    and no cast runs per step. Frozen weights take no optimizer step, so no fp32 master copy is
    lost. Embeddings and norms stay as they are (autocast leaves their dtype alone)."""
    from lmforge.finetune.lora import LoRALinear

    cast = 0
    for module in model.modules():
        for name in ("weight", "bias"):
            param = getattr(module, name, None) if isinstance(module, (nn.Linear, LoRALinear)) else None
            if isinstance(param, nn.Parameter) and not param.requires_grad and param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
                cast += 1
    return cast


class TrainLoop:
    """One training run of any stage; `run()` trains until max_steps, a signal, or the guard gives up.

    `model` is the bare model (the stage built or loaded it, seeded); `cfg` is the run's config,
    read for its `train`, `guard` and `debug` sections and written into checkpoints (with the
    max_steps / warmup the time budget chose: the loop keeps those in its own copy of `train`
    and never changes `cfg`).
    """

    def __init__(self, objective: Objective, model: nn.Module, cfg: RunConfig, run_dir: Path, par: Any,
                 resume_from: Path | None = None, time_budget_s: float | None = None,
                 clock: Callable[[], float] = time.perf_counter, tokenizer_dir: Path | None = None,
                 write_weights: WeightsWriter | None = None):
        self.clock = clock  # seconds; injectable so tests can drive the time budget
        self.t_start = clock()
        self.objective, self.cfg, self.run_dir, self.par = objective, cfg, Path(run_dir), par
        self.train = dataclasses.replace(cfg.train)  # max_steps and warmup_steps change with the budget
        self.device = par.device
        self.tokenizer_dir = tokenizer_dir
        # How a checkpoint stores the model: the full weights (default), or a LoRA run's adapters.
        self.write_weights: dict[str, Any] = {"write_weights": write_weights} if write_weights else {}
        self.max_steps = self.train.max_steps
        self.time_budget_s = time_budget_s
        self.sizings = 0  # times max_steps was (re)estimated from the measured speed
        self.end_costs: dict[str, float] = {}  # slowest evaluation / sample / checkpoint so far, s
        # (step, cosine progress there) from which the schedule walks to max_steps: set when
        # max_steps changes mid-run, so the learning rate goes on from where it was.
        self.schedule_anchor: tuple[int, float] | None = None

        # Parameters the objective does not train are frozen before any wrapper sees the model
        # (DDP and FSDP register only what requires gradients; the optimizer skips the rest).
        trainable = {id(p) for p in objective.trainable_parameters(model)}
        for p in model.parameters():
            if id(p) not in trainable:
                p.requires_grad_(False)
        # the bare model (or this rank's pipeline stage)
        self.model = par.parallelize(prepare_for_training(model, self.train, self.device))
        objective.attach(self.model, par)
        self.optimizer = build_optimizer(self.model, self.train, self.device)
        self.autocast = autocast_for(cfg, self.device)
        self.guard = LossGuard(cfg.guard)
        self.faults = FaultInjector(cfg.debug.inject)
        self.checkpoints = CheckpointManager(self.run_dir, self.train.keep_last)
        self.metrics = MetricsLogger(self.run_dir, enabled=par.is_main, tensorboard=self.train.tensorboard)
        self.peak = peak_flops(self.device)
        # train.eval_tasks: benchmarks run beside the objective's validation (checked up front).
        self.task_eval = training_eval(self.train, tokenizer_dir, self.run_dir)

        self.step = 0
        self.tokens = 0
        self.last_loss: float | None = None
        self.last_val: dict[str, float] = {}
        self.stop_signal: int | None = None
        self.last_checkpoint: Path | None = None
        # {"step", "metric", "value"} of the best checkpoint by objective.select_by so far
        self.selected: dict[str, Any] | None = None

        if par.is_main:
            self.checkpoints.remove_partial()
        if resume_from is not None:
            ckpt = read_checkpoint(resume_from)
            self._restore(ckpt, rollback=False)
            self.selected = read_selected(self.checkpoints.root)
            self.metrics.truncate_after(self.step)
            self.metrics.log({"step": self.step, "event": "resume", "checkpoint": str(resume_from)})
        else:
            if self.checkpoints.complete():
                raise UserError(f"{self.run_dir} already holds checkpoints; pass --resume to continue "
                                "that run, or choose a new --out")
            self.metrics.truncate_after(-1)
            # The starting point is a checkpoint too: the guard can roll back to it.
            self._save_checkpoint()

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    # ---- the loop

    def run(self) -> TrainResult:
        cfg = self.train
        previous_handlers = self._install_signal_handlers()
        self.metrics.start_bar(self.max_steps, self.step)
        window_start, window_tokens = self.clock(), 0
        mark: tuple[float, int] | None = None  # (time, step) where the current speed measurement began
        try:
            if self.step == 0 and self.objective.select_by:
                self._evaluate(0)  # the starting model is a candidate too: never end worse than it
            while self.step < self.max_steps:
                step = self.step + 1
                loss, grad_norm, reason = self._attempt_step(step)
                if reason is not None:
                    self._roll_back(step, reason, loss, grad_norm)
                    mark = None  # steps went back: measure the speed afresh from here
                    continue
                tokens = self.objective.tokens_per_step
                self.step, self.tokens, self.last_loss = step, self.tokens + tokens, loss
                window_tokens += tokens
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
                self._agree_on_stop()
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
            self.objective.close()
        if self.stop_requested:
            self.metrics.write(f"stopped by signal at step {self.step}; resume with --resume")
        return TrainResult(self.step, self.max_steps, self.tokens, self.last_loss,
                           self.last_val.get("val_loss"), self.last_val.get("val_bpb"),
                           self.last_checkpoint, self.stop_requested, self.stop_signal)

    def _attempt_step(self, step: int) -> tuple[float, float, str | None]:
        """Forward/backward over the micro-batches of `step`; apply it only if the guard agrees."""
        par, accum = self.par, self.objective.accum
        for _ in range(self.guard.batches_to_skip(step) * accum):
            self.objective.next_batch()  # the data that caused a rollback here is left out
        if self.faults.due("sigkill", step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.faults.due("sigterm", step):
            os.kill(os.getpid(), signal.SIGTERM)
        factor = self.faults.loss_factor(step)
        losses = []
        for micro in range(accum):
            batch = self.objective.next_batch()
            with self.autocast():
                micro_loss = self.objective.forward_backward(par, self.model, batch, factor / accum,
                                                             micro == accum - 1)
            losses.append(micro_loss)
        loss = float(torch.stack(losses).mean()) * factor
        max_norm = self.train.grad_clip
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
        return (lr_multiplier(step, self.train, self.max_steps, self.schedule_anchor)
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
            "lr": self.train.lr * self._lr_multiplier(step), "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
        }
        if self.peak and self.objective.flops_per_token:
            # Every rank processes tokens_per_s / world_size of them against its own peak.
            record["mfu"] = tokens_per_s * self.objective.flops_per_token / (self.peak * self.par.world_size)
        record["memory_gb"] = memory_gb(self.device)
        record["elapsed_s"] = self.clock() - self.t_start
        record.update(self.objective.step_metrics())
        self.metrics.log(record)
        self.metrics.update_bar(step, self.max_steps, loss, tokens_per_s)

    def _watch(self, step: int, final: bool = False) -> None:
        cfg = self.train
        last = final or step >= self.max_steps
        if step % cfg.eval_every == 0 or last:
            self._evaluate(step)
        if cfg.sample_every and (step % cfg.sample_every == 0 or last):
            with self._timed("sample"):
                text = self.sample()
            if text is not None:
                self.metrics.log({"step": step, "sample": text})
        if step % cfg.checkpoint_every == 0 or last or self.stop_requested:
            with self._timed("checkpoint"):
                self._save_checkpoint()

    def _evaluate(self, step: int) -> None:
        with self._timed("eval"):
            self.last_val = self.evaluate()
        if self.last_val:
            self.metrics.log({"step": step, **self.last_val})
            self.metrics.write(f"step {step}: " + "  ".join(f"{k} {v:.4f}" for k, v in self.last_val.items()))
        self._select(step)

    def _select(self, step: int) -> None:
        """Keep the checkpoint of a new best `objective.select_by` score (ties keep the earlier)."""
        metric = self.objective.select_by
        value = self.last_val.get(metric) if metric else None
        if value is None:
            return
        better = self.selected is None or value > self.selected["value"]
        # Collective decision (the checkpoint is): every rank follows the main rank's verdict.
        if not float(self.par.all_reduce(torch.tensor(float(better and self.par.is_main)), "max")):
            return
        self.selected = {"step": step, "metric": metric, "value": float(value)}
        with self._timed("checkpoint"):
            self._save_checkpoint()
        if self.par.is_main:
            atomic_write_json(self.checkpoints.root / SELECTED_FILE, self.selected)
            self.checkpoints.prune()  # the previous best may go now
            self.metrics.write(f"step {step}: best {metric} so far ({value:.4f}); selected as the run's result")

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        """Keep the slowest duration of `name` (end-of-run work the time budget must leave room for)."""
        start = self.clock()
        yield
        self.end_costs[name] = max(self.end_costs.get(name, 0.0), self.clock() - start)

    def evaluate(self) -> dict[str, float]:
        scores = self.objective.evaluate(self.model, self.par, self.autocast)
        if self.task_eval is not None and self.par.is_main:
            with self.autocast(), run_compiled_code_eagerly():
                scores = {**scores, **self.task_eval(self.model)}
        return scores

    def sample(self) -> str | None:
        return self.objective.sample(self.model, self.par, self.autocast, self.step)

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
        if self.train.schedule == "wsd" and self.step >= wsd_decay_start(self.train, self.max_steps):
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
        cfg = self.train
        assert self.time_budget_s is not None
        tokens_per_step = self.objective.tokens_per_step
        if self.sizings == 0:
            # Measured before any evaluation: add its estimated share (a validation batch is a
            # forward pass, about a third of a training micro-batch). Later measurements include it.
            seconds_per_step *= 1 + cfg.eval_batches / (3 * self.objective.accum) / cfg.eval_every
        remaining = self.time_budget_s - self._reserve_s() - (self.clock() - self.t_start)
        steps = self.step + max(1, int(remaining / seconds_per_step))
        if self.objective.max_budget_steps is not None:  # more would only repeat its data
            steps = min(steps, max(self.objective.max_budget_steps, self.step + 1))
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
                          "warmup_steps": cfg.warmup_steps, "tokens_budget": steps * tokens_per_step})
        self.metrics.write(f"time budget {self.time_budget_s:.0f}s at {seconds_per_step:.3f}s/step: "
                           f"{steps} steps, {steps * tokens_per_step:,} tokens")

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
        needed = ["eval", "checkpoint"] + (["sample"] if self.train.sample_every else [])
        if any(name not in self.end_costs for name in needed):
            return cap
        return min(cap, 1.0 + 2.0 * sum(self.end_costs[name] for name in needed))

    # ---- checkpoints

    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens,
            "max_steps": self.max_steps,
            "scheduler": {"schedule": self.train.schedule, "max_steps": self.max_steps,
                          "anchor": self.schedule_anchor,
                          "lr_multiplier": self._lr_multiplier(self.step) if self.step else 0.0},
            "loader": self.objective.state_dict(),
            "guard": self.guard.state_dict(),
            "faults_fired": self.faults.state_dict(),
            "val_loss": self.last_val.get("val_loss"),
            "val_bpb": self.last_val.get("val_bpb"),
            "world_size": self.par.world_size,
        }

    def checkpoint_config(self) -> RunConfig:
        """The run's config as a checkpoint records it: with the max_steps and warmup it runs to."""
        return dataclasses.replace(self.cfg, train=dataclasses.replace(self.train, max_steps=self.max_steps))

    def _save_checkpoint(self) -> None:
        if self.last_checkpoint is not None and _step_of(self.last_checkpoint) == self.step:
            return
        if self.train.checkpoint_format == "sharded":  # collective: every rank writes its shards
            self.last_checkpoint = self.checkpoints.save_sharded(
                self.step, self.model, self.optimizer,
                die_midway=self.faults.due("sigkill_in_checkpoint", self.step),
                cfg=self.checkpoint_config(), trainer_state=self.trainer_state(),
                tokenizer_dir=self.tokenizer_dir, **self.write_weights,
            )
            return
        model_state = self.par.full_state_dict(self.model)  # collective
        optimizer_state = self.par.optimizer_state_dict(self.model, self.optimizer)  # collective
        if self.par.is_main:
            self.last_checkpoint = self.checkpoints.save(
                self.step, die_midway=self.faults.due("sigkill_in_checkpoint", self.step),
                cfg=self.checkpoint_config(), model_state=model_state, optimizer_state=optimizer_state,
                trainer_state=self.trainer_state(), tokenizer_dir=self.tokenizer_dir, **self.write_weights,
            )
        else:
            self.last_checkpoint = self.checkpoints.root / f"step_{self.step:08d}"
        self.par.barrier()

    def _restore(self, ckpt: TrainingCheckpoint, rollback: bool) -> None:
        """Load a checkpoint into the live run. A rollback keeps the guard's and faults' history."""
        if ckpt.shards is not None:
            load_shards(ckpt.shards, self.par, self.model, self.optimizer)  # collective, resharding
        elif ckpt.trained_only:  # the trained tensors (LoRA adapters); the frozen rest is unchanged
            _load_trained(self.model, ckpt)
            self.par.load_optimizer_state_dict(self.model, self.optimizer, ckpt.optimizer)
        else:
            self.par.load_full_state_dict(self.model, {k: v.to(self.device) for k, v in ckpt.model.items()})
            self.par.load_optimizer_state_dict(self.model, self.optimizer, ckpt.optimizer)
        state = ckpt.trainer
        # max_steps stays as configured: a resumed run may be extended with --set train.max_steps.
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.objective.load_state_dict(state["loader"])
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

    def _agree_on_stop(self) -> None:
        """A signal on any rank stops every rank after the same step (else the others would wait
        in a collective for a rank that left). One process: nothing to agree."""
        if self.par.world_size == 1:
            return
        signum = int(self.par.all_reduce(torch.tensor(float(self.stop_signal or 0)), "max"))
        if signum and self.stop_signal is None:
            self.stop_signal = signum

    def _install_signal_handlers(self) -> dict[int, Any]:
        def request_stop(signum, frame):
            if self.stop_requested:
                # A second signal: stop now. A checkpoint being written is left as a temporary
                # directory that atomic_directory removes (and the next start too): never half a one.
                raise Interrupted(signum, saved=False)
            self.stop_signal = signum
            self.metrics.write(f"{signal.Signals(signum).name}: finishing step, then checkpointing "
                               "(again to stop at once)")

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _load_trained(model: nn.Module, ckpt: TrainingCheckpoint) -> None:
    """Load a checkpoint that holds exactly the model's trainable tensors."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(ckpt.model) != trainable:
        raise UserError(f"checkpoint {ckpt.path} holds other trained tensors than this run trains "
                        f"(e.g. {sorted(set(ckpt.model) ^ trainable)[0]!r}); its lora config differs")
    model.load_state_dict(ckpt.model, strict=False)  # copies into the live parameters, any device


def _step_of(path: Path) -> int:
    return int(path.name.split("_")[-1])


__all__ = ["Objective", "TrainLoop", "TrainResult", "autocast_for", "prepare_for_training",
           "run_compiled_code_eagerly", "seed_everything"]
