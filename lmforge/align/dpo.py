"""Direct preference optimisation: preference pairs -> a policy that prefers the chosen answers.

DPO (Rafailov et al. 2023) trains the policy pi directly on pairs (x, y_w, y_l), with the
reference model pi_ref (the starting checkpoint) as an anchor. With the log-ratios
r(y) = log pi(y|x) - log pi_ref(y|x), summed over the answer's tokens:

    sigmoid        -log sigmoid(beta (r(y_w) - r(y_l)))          (with label smoothing e:
                   -(1 - e) log sigmoid(z) - e log sigmoid(-z))
    ipo            ((r(y_w) - r(y_l)) - 1 / (2 beta))^2          (Azar et al. 2023)
    sigmoid_norm   as sigmoid, on r averaged per answer token: a longer answer no longer
                   moves the margin more (DPO's length bias)

With dpo.nll_weight = a > 0, a x the chosen answers' negative log-likelihood per token is added
(RPO): the preference loss is satisfied as well by pushing both answers down as by pulling the
chosen one up, and on a small model's own answers the first breaks them (measured in
benchmarks/RESULTS.md); the language-model term keeps the right answers likely.

beta r(y) is the answer's implicit reward; the metrics log its mean for chosen and rejected
answers, their margin, and how often the chosen one wins (`reward_accuracy`).

The reference log-probabilities are computed once, before training, with the base model (a LoRA
run's adapters switched off), batched and without gradients, and cached in the run directory
(RUN_DIR/reference_logps.safetensors): no second model stays in memory, and a resumed run reads
them instead of computing them again. `DPOObjective` is an objective on the shared loop
(lmforge/train/loop.py), so accumulation, the guard, the time budget, checkpoints, exact resume,
signals and torchrun are the loop's; the run directory is laid out like an SFT run's, with
`base.json`, and its checkpoints are normal ones (or LoRA ones) that load_model reads.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align.pairs import PairData, RenderedPair, Row, load_pairs, render_pairs
from lmforge.config import RunConfig
from lmforge.errors import UserError
from lmforge.finetune.data import IGNORE, bucket_batches, collate
from lmforge.finetune.lora import BaseRef
from lmforge.tasks.common import Example, Task
from lmforge.train.loop import (
    Autocast,
    Objective,
    TrainLoop,
    TrainResult,
    autocast_for,
    seed_everything,
)

# What `lmforge dpo` starts from before --preset / --config / --set: a trained chat model moved a
# little (DPO over-optimises fast), no weight decay, frequent held-out evaluation.
DPO_TRAIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=200, batch_size=8, lr=5e-5, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0,
    eval_every=25, eval_batches=10, checkpoint_every=50, sample_every=0,
)
# The spike guard's floor for preference losses: a batch of 8 pairs' mean loss swings between ~0
# (pairs already learnt) and ~1 (new ones) as a matter of course, which the default floor (0.05
# nats, made for a language-model loss) calls spikes until the run stops. With 0.25 a spike is a
# batch mean some 2.2 nats above the recent median: the policy preferring rejected answers by far.
PREFERENCE_GUARD_DEFAULTS: dict[str, Any] = dict(min_abs_spread=0.25)
# A time budget pays for building the pairs and the reference pass before the loop; whatever they
# took, the loop keeps at least this share of the budget (so the run may overrun by that much).
SETUP_FLOOR = 0.2
REFERENCE_CACHE = "reference_logps.safetensors"  # RUN_DIR/...: the reference's answer log-probs
T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# The losses, as pure functions of summed answer log-probabilities


@dataclass
class PreferenceLoss:
    losses: torch.Tensor  # (pairs,): the preference loss of each pair
    chosen_rewards: torch.Tensor  # (pairs,) beta x log-ratio, detached
    rejected_rewards: torch.Tensor


def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
                    beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0,
                    chosen_tokens: torch.Tensor | None = None,
                    rejected_tokens: torch.Tensor | None = None) -> PreferenceLoss:
    """Per-pair DPO-family losses from summed answer log-probabilities (see the module docstring).
    "sigmoid_norm" needs the answers' token counts."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    if loss == "sigmoid_norm":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the sigmoid_norm loss needs chosen_tokens and rejected_tokens")
        chosen_ratio = chosen_ratio / chosen_tokens.clamp(min=1)
        rejected_ratio = rejected_ratio / rejected_tokens.clamp(min=1)
    margin = chosen_ratio - rejected_ratio
    if loss in ("sigmoid", "sigmoid_norm"):
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * margin)
                  - label_smoothing * F.logsigmoid(-beta * margin))
    elif loss == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}")
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# --------------------------------------------------------------------------------------------
# Answer log-probabilities


def pair_batch(pairs: Sequence[RenderedPair], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch of pairs: the chosen rows, then the rejected ones."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


def answer_logprobs(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    **loss_options: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each row's answer tokens (targets that are not -100) and the
    number of those tokens; through `model.loss`, with the memory-light head of head_logprobs."""
    from lmforge.align.head_logprobs import model_token_nll

    nll = model.loss(x, y, reduction="none", **{**loss_options, "head_loss": model_token_nll(model)})
    return -nll.sum(dim=-1), (y != IGNORE).sum(dim=-1)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """The base model: every LoRA update scaled by 0 for the duration (full fine-tuning: as is)."""
    from lmforge.finetune.lora import lora_layers

    layers = list(lora_layers(model).values())
    scales = [layer.scale for layer in layers]
    for layer in layers:
        layer.scale = 0.0
    try:
        yield
    finally:
        for layer, scale in zip(layers, scales, strict=True):
            layer.scale = scale


@torch.no_grad()
def reference_logprobs(model: nn.Module, rows: Sequence[Row], pad_id: int, batch_size: int,
                       autocast: Autocast) -> torch.Tensor:
    """Summed answer log-probabilities (float64) of `rows` under the base model, batched by length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros(len(rows), dtype=torch.float64)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    with adapters_off(model):
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            x, y = collate([rows[i] for i in index], pad_id)
            with autocast():
                logps, _ = answer_logprobs(model, x.to(device), y.to(device))
            out[index] = logps.double().cpu()
    model.train(was_training)
    return out


def cached_reference(run_dir: Path, model: nn.Module, train: Sequence[RenderedPair],
                     val: Sequence[RenderedPair], base: BaseRef, pad_id: int, batch_size: int,
                     autocast: Autocast) -> dict[str, torch.Tensor]:
    """{"train_chosen", "train_rejected", "val_chosen", "val_rejected"} reference log-probs: read
    from RUN_DIR/reference_logps.safetensors when it was made for these pairs and this base,
    else computed and written there."""
    from safetensors import safe_open
    from safetensors.torch import save

    from lmforge.atomic import atomic_write_bytes

    file = Path(run_dir) / REFERENCE_CACHE
    digest = hashlib.sha256(base.sha256.encode())
    for pair in [*train, *val]:
        digest.update(json.dumps([pair.chosen, pair.rejected]).encode())
    fingerprint = digest.hexdigest()
    if file.is_file():
        with safe_open(str(file), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    cache = {}
    for split, pairs in (("train", train), ("val", val)):
        for side in ("chosen", "rejected"):
            rows = [getattr(p, side) for p in pairs]
            cache[f"{split}_{side}"] = reference_logprobs(model, rows, pad_id, batch_size, autocast)
    atomic_write_bytes(file, save(cache, metadata={"fingerprint": fingerprint}))
    return cache


# --------------------------------------------------------------------------------------------
# The objective


class DPOObjective(Objective):
    """Batches of pairs (chosen rows then rejected rows, right-padded) with their cached reference
    log-probabilities; the loss of `dpo.loss`. The data position is (epoch, batch index), each
    epoch's batches ordered with the seed train.seed + epoch, as SFT's."""

    def __init__(self, cfg: RunConfig, train: list[RenderedPair], val: list[RenderedPair],
                 reference: dict[str, torch.Tensor], pad_id: int, par: Any,
                 held_out: HeldOutTasks | None = None) -> None:
        from lmforge.train.pretrain import batch_geometry

        self.train, self.dpo, self.par, self.device = cfg.train, cfg.dpo, par, par.device
        self.rank, self.dp = par.dp_rank, par.dp_size
        _, self.accum, _ = batch_geometry(cfg, par.dp_size)
        if len(train) < self.dp:
            raise UserError(f"dpo: {len(train)} training pairs fit the context; need at least {self.dp}")
        self.pairs, self.val_pairs, self.reference, self.pad_id = train, val, reference, pad_id
        self.epoch, self.index = 0, 0
        self._batches: list[list[int]] | None = None
        self._recent: collections.deque[int] = collections.deque(maxlen=self.accum)
        self._stats: collections.deque[torch.Tensor] = collections.deque(maxlen=self.accum)
        self.loss_options: dict[str, Any] = {}
        self.held_out, self.autocast = held_out, autocast_for(cfg, self.device)
        self.model: nn.Module | None = None
        self._engine: Any = None
        self.select_by = "pass_at_1" if held_out is not None and cfg.dpo.select_best else None
        if cfg.dpo.max_epochs:
            self.max_budget_steps = max(1, math.ceil(cfg.dpo.max_epochs * len(self._epoch_batches()) / self.accum))

    @property
    def tokens_per_step(self) -> int:  # type: ignore[override]
        return sum(self._recent)

    def attach(self, model: nn.Module, par: Any) -> None:
        from lmforge.train.pretrain import loss_options

        self.loss_options = loss_options(model, self.train, self.device)
        self.model = model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            longest = [p.longest for p in self.pairs]
            batches = bucket_batches(longest, self.train.batch_size * self.dp, self.train.seed + self.epoch)
            self._batches = [b for b in batches if len(b) >= self.dp]
        return self._batches

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        if self.index >= len(self._epoch_batches()):
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        batch = self._epoch_batches()[self.index]
        self.index += 1
        self._recent.append(sum(len(self.pairs[i].chosen[0]) + len(self.pairs[i].rejected[0]) - 2 for i in batch))
        mine = batch[self.rank::self.dp]
        return self._tensors([self.pairs[i] for i in mine], mine, "train")

    def _tensors(self, pairs: list[RenderedPair], index: list[int], split: str) -> tuple[torch.Tensor, ...]:
        x, y = pair_batch(pairs, self.pad_id)
        chosen = self.reference[f"{split}_chosen"][index]
        rejected = self.reference[f"{split}_rejected"][index]
        return tuple(t.to(self.device) for t in (x, y, chosen, rejected))

    def _pair_losses(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[PreferenceLoss, torch.Tensor]:
        """The preference losses of the batch's pairs, and the chosen answers' mean negative
        log-likelihood per token (dpo.nll_weight's term)."""
        x, y, reference_chosen, reference_rejected = batch
        logps, tokens = answer_logprobs(model, x, y, **self.loss_options)
        n = x.shape[0] // 2
        result = preference_loss(logps[:n].double(), logps[n:].double(), reference_chosen, reference_rejected,
                                 self.dpo.beta, self.dpo.loss, self.dpo.label_smoothing, tokens[:n], tokens[n:])
        return result, -logps[:n].sum() / tokens[:n].sum().clamp(min=1)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        result, chosen_nll = self._pair_losses(model, batch)
        self._stats.append(_reward_sums(result))
        loss = result.losses.mean().float()
        return loss + self.dpo.nll_weight * chosen_nll.float() if self.dpo.nll_weight else loss

    def step_metrics(self) -> dict[str, float]:
        """Mean implicit rewards of the latest step's pairs (all ranks; collective)."""
        if not self._stats:
            return {}
        totals = self.par.all_reduce(torch.stack(list(self._stats)).sum(0).to(self.device), "sum")
        return _reward_metrics(totals)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, par: Any, autocast: Autocast) -> dict[str, float]:
        """The loss and implicit-reward metrics of the held-out pairs (the same batches each time),
        and the held-out questions' pass@1."""
        if not self.val_pairs:
            return self._pass_at_1(par)
        batches = bucket_batches([p.longest for p in self.val_pairs], self.train.batch_size, seed=0)
        was_training = model.training
        model.eval()
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        for batch in batches[: self.train.eval_batches][self.rank::self.dp]:
            with autocast():
                result, _ = self._pair_losses(model, self._tensors([self.val_pairs[i] for i in batch], batch, "val"))
            totals += torch.cat([result.losses.sum()[None], _reward_sums(result).to(self.device)])
        model.train(was_training)
        totals = par.all_reduce(totals, "sum")
        metrics = _reward_metrics(totals[1:])
        return {"val_loss": float(totals[0] / totals[-1].clamp(min=1)), "reward_accuracy": metrics["reward_accuracy"],
                "reward_margin": metrics["reward_margin"], **self._pass_at_1(par)}

    def _pass_at_1(self, par: Any) -> dict[str, float]:
        """{"pass_at_1": ...} on the held-out task questions (none without them)."""
        from lmforge.align.heldout import generating, live_engine, pass_at_1
        from lmforge.chat import render_prompt
        from lmforge.tasks.score import MAX_BATCH

        h = self.held_out
        if h is None or self.model is None:
            return {}
        if self._engine is None:
            self._engine = live_engine(self.model, h.tokenizer, MAX_BATCH, autocast=self.autocast)
        with generating(self._engine, self.model, self.autocast) as engine:
            value = pass_at_1(engine, h.questions, h.tasks, lambda e: render_prompt(h.tokenizer, e.prompt),
                              self.dpo.prefs_max_tokens, par)
        return {"pass_at_1": value}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._batches = int(state["epoch"]), int(state["index"]), None


@dataclass
class HeldOutTasks:
    """Test-split task questions whose greedy pass@1 a DPO run measures at each evaluation."""

    tokenizer: Any
    tasks: dict[str, Task]
    questions: list[Example]


def held_out_tasks(cfg: RunConfig, tokenizer: Any) -> HeldOutTasks | None:
    """With builtin:prefs among dpo.data, dpo.eval_examples questions of dpo.prefs_tasks (the
    tasks the pairs teach); None when there are no such tasks or eval_examples is 0."""
    from lmforge.align.heldout import held_out_questions
    from lmforge.align.pairs import BUILTIN_PREFS, parse_source
    from lmforge.align.prefs import verifiable_mixture
    from lmforge.tasks import make_tasks

    if not cfg.dpo.eval_examples or all(parse_source(s).path != BUILTIN_PREFS for s in cfg.dpo.data):
        return None
    tasks = make_tasks()
    shares = verifiable_mixture(tasks, cfg.dpo.prefs_tasks)
    return HeldOutTasks(tokenizer, tasks, held_out_questions(tasks, cfg.dpo.eval_examples, shares))


def _reward_sums(result: PreferenceLoss) -> torch.Tensor:
    """[margin, chosen wins, chosen reward, rejected reward, pairs] summed over the pairs."""
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return torch.stack([(chosen - rejected).sum(), (chosen > rejected).double().sum(), chosen.sum(),
                        rejected.sum(), torch.tensor(float(len(chosen)), dtype=torch.float64,
                                                     device=chosen.device)]).double()


def _reward_metrics(totals: torch.Tensor) -> dict[str, float]:
    n = float(totals[4].clamp(min=1))
    return {"reward_margin": float(totals[0]) / n, "reward_accuracy": float(totals[1]) / n,
            "chosen_reward": float(totals[2]) / n, "rejected_reward": float(totals[3]) / n}


# --------------------------------------------------------------------------------------------
# Running it


def main_rank_first(par: Any, make: Callable[[], T]) -> T:
    """`make()` on the main rank, then on the others (which find what it cached on disk)."""
    value = make() if par.is_main else None
    par.barrier()
    return value if par.is_main else make()


def policy_pairs(cfg: RunConfig, section: Any, model: nn.Module, tokenizer: Any, base: BaseRef,
                 run_dir: Path) -> PairData:
    """The pairs of `section.data` (dpo or reward); builtin:prefs sampled from `model` with the
    dpo.prefs_* settings and cached in the run directory."""
    from lmforge.align.prefs import cached_prefs, make_prefs, prefs_fingerprint

    def builtin() -> PairData:
        fingerprint = prefs_fingerprint(base.sha256, cfg.dpo, cfg.train.seed)
        return cached_prefs(run_dir, fingerprint, lambda: make_prefs(model, tokenizer, cfg.dpo, cfg.train.seed))

    return load_pairs(section.data, cfg.train.seed, section.val_fraction, builtin)


@dataclass
class PairsRun:
    """What a DPO or reward-model run trains on: the pairs, rendered, and what was left out."""

    data: PairData
    train: list[RenderedPair]
    val: list[RenderedPair]
    dropped: int  # pairs with an answer longer than the context

    def describe(self) -> list[str]:
        return [*self.data.notes, f"{len(self.train)} training and {len(self.val)} held-out pairs; "
                f"{self.dropped} left out for being longer than the context"]


def prepare_pairs(cfg: RunConfig, section: Any, model: nn.Module, tokenizer: Any, base: BaseRef,
                  run_dir: Path, par: Any, context: int) -> PairsRun:
    """Read (or sample, on the main rank first) the pairs of `section` and render those whose
    rows fit in `context` + 1 tokens."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = main_rank_first(par, lambda: policy_pairs(cfg, section, model, tokenizer, base, run_dir))
    train, dropped = render_pairs(tokenizer, data.train, context)
    val, val_dropped = render_pairs(tokenizer, data.val, context)
    if not train:
        raise UserError(f"no training pair fits the context of {context} tokens")
    return PairsRun(data, train, val, dropped + val_dropped)


def dpo(cfg: RunConfig, base: BaseRef, run_dir: str | Path, resume_from: Path | None = None,
        time_budget_s: float | None = None, par: Any = None,
        clock: Callable[[], float] = time.perf_counter,
        report: Callable[[str], None] = print) -> TrainResult:
    """Align the base checkpoint on the pairs of cfg.dpo.data, writing metrics and checkpoints
    into `run_dir`. `report` gets the lines a user sees before training."""
    from lmforge.distributed import init_parallel
    from lmforge.finetune.lora import describe_trainable
    from lmforge.finetune.sft import chat_tokenizer, load_base, lora_writer, run_recorded
    from lmforge.train.pretrain import batch_geometry

    run_dir = Path(run_dir)
    started = clock()
    tokenizer, tokenizer_dir = chat_tokenizer(base, "DPO")
    owns_par = par is None
    par = par or init_parallel(cfg)
    try:
        seed_everything(cfg.train.seed)
        model = load_base(base, cfg).to(par.device)
        context, _, _ = batch_geometry(cfg, par.dp_size)
        pairs = prepare_pairs(cfg, cfg.dpo, model, tokenizer, base, run_dir, par, context)
        reference = main_rank_first(par, lambda: cached_reference(
            run_dir, model, pairs.train, pairs.val, base, tokenizer.pad_id, cfg.train.batch_size * 2,
            autocast_for(cfg, par.device)))
        objective = DPOObjective(cfg, pairs.train, pairs.val, reference, tokenizer.pad_id, par,
                                 held_out_tasks(cfg, tokenizer))
        if time_budget_s is not None:  # sampling builtin:prefs and the reference pass count too
            time_budget_s = max(time_budget_s - (clock() - started), SETUP_FLOOR * time_budget_s)

        loop = TrainLoop(objective, model, cfg, run_dir, par, resume_from=resume_from,
                         time_budget_s=time_budget_s, clock=clock, tokenizer_dir=tokenizer_dir,
                         write_weights=lora_writer(model, base, cfg))
        kind = f"LoRA rank {cfg.lora.rank}" if cfg.lora.rank else "full fine-tuning"
        nll = f" + {cfg.dpo.nll_weight:g} x NLL of the chosen answers" if cfg.dpo.nll_weight else ""
        return run_recorded(loop, cfg, base, run_dir, par, [
            f"dpo: {cfg.dpo.loss} loss{nll}, beta {cfg.dpo.beta:g}, {kind}: {describe_trainable(model)}",
            *(f"dpo: {line}" for line in pairs.describe())], report)
    finally:
        if owns_par:
            par.shutdown()


def run_dpo(cfg: RunConfig, checkpoint: str | Path, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """`lmforge dpo` for a caller holding a config (the lifecycle pipeline): the pairs come from
    cfg.dpo.data, the time budget from cfg.train.time_budget, the train settings are cfg.train as
    given (`lmforge dpo` starts them from DPO_TRAIN_DEFAULTS, its guard from
    PREFERENCE_GUARD_DEFAULTS), and cfg.model must be the
    checkpoint's. With `resume`, a run directory that holds a complete checkpoint continues from
    its newest one (its base must be `checkpoint`); otherwise the run starts afresh."""
    from lmforge.finetune.stages import DPO, run_stage

    return run_stage(DPO, cfg, checkpoint, run_dir, resume)


__all__ = ["DPO_TRAIN_DEFAULTS", "DPOObjective", "HeldOutTasks", "PREFERENCE_GUARD_DEFAULTS", "PairsRun",
           "PreferenceLoss", "REFERENCE_CACHE",
           "adapters_off", "answer_logprobs", "cached_reference", "dpo", "held_out_tasks",
           "main_rank_first",
           "pair_batch", "policy_pairs", "preference_loss", "prepare_pairs", "reference_logprobs", "run_dpo"]
