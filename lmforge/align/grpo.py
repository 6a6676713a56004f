"""GRPO: reinforcement learning with verifiable rewards, one objective on the shared loop.

One rollout batch, every `grpo.epochs_per_batch` optimizer steps:

    prompts       grpo.prompts_per_step questions of the tasks' train split, drawn from
                  (train.seed, rollout batch index), so a resumed run draws the same ones
    sample        grpo.group_size answers per prompt from the current policy through the Engine
                  (one prefill per prompt, fanned out; per-request seeds from the same pair)
    reward        the task's `reward` (1 for the exact answer), or the reward model's score
                  (grpo.reward_model), plus grpo.format_reward x (ends with `#### N` then <|end|>)
    advantage     reward - group mean, divided by the group's standard deviation when
                  grpo.scale_rewards; a group whose rewards are all equal carries no signal: it is
                  counted (`zero_signal_groups`) and left out of the loss (no gradient, no compute)
    log-probs     one no-grad pass of the policy (the "old" log-probs of the importance ratio, the
                  entropy) and of the reference (the starting model; for LoRA the same model with
                  its adapters switched off) over every answer: `kl` is logged at every step

and the loss of each step (`grpo_token_loss`), per answer token t of sequence i:

    ratio_t = exp(logp_t - old_t)
    loss_t  = -min(ratio_t A_i, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) A_i) + kl_coef k3_t
    k3_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1        (non-negative, unbiased KL estimate)
    loss    = sum over every trained token of the batch / number of those tokens

Token-level normalisation (DAPO, Dr. GRPO): GRPO's per-sequence mean gives each token of a long
answer less weight than each token of a short one, which biases towards long wrong answers and
short right ones; one sum over the batch's tokens divided by their count weighs every token alike.
The importance ratio is 1 in the first step on a batch (the policy has not moved since it sampled)
and matters from the second on; the clip keeps those steps near the sampling policy.

The log-probabilities are those of the distribution the Engine samples from: logits restricted to
the tokenizer's vocabulary, divided by grpo.temperature. The Engine reports the log-probability of
the tokens it samples but not of forced ones nor the entropy, and the loss needs gradients anyway,
so the objective runs its own forward passes over the finished sequences. An answer ends at <|end|>
only (the Engine's stop set is narrowed to it), so the token that ended it is known and trained;
calculator results the Engine forces into an answer are not the policy's and are masked out.

Runs on one process or "ddp" (each rank samples its share of the prompts with its full replica).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align.heldout import held_out_questions
from lmforge.config import RunConfig
from lmforge.errors import UserError
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

# What `lmforge grpo` starts from before --preset / --config / --set: RL moves a fine-tuned model
# a little per step (a low learning rate, no weight decay), evaluates pass@1 often; a micro-batch
# (train.batch_size) is that many sequences of the rollout batch.
GRPO_TRAIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=200, batch_size=16, lr=5e-5, warmup_steps=5, min_lr_ratio=0.5, weight_decay=0.0,
    eval_every=25, checkpoint_every=50, sample_every=0,
)
# The surrogate loss is no quantity that should go down: its value swings by up to the largest
# advantage (sqrt(group_size - 1) with std scaling) from one batch to the next. A spread floor of
# 1 nat (a spike is 6 above the median) leaves the guard to NaNs and real blow-ups (a KL term).
GRPO_GUARD_DEFAULTS: dict[str, Any] = dict(min_abs_spread=1.0)
CHAT_TASKS = "chat"  # every verifiable built-in task
_FORMAT = re.compile(r"####\s*-?[\d,]+\s*$")  # the GSM8K-style final line: `#### 42`
_STD_EPS = 1e-4  # added to the group std before dividing (a group of equal rewards has std 0)


# --------------------------------------------------------------------------------------------
# The pure parts: advantages, the loss, log-probabilities


def group_advantages(rewards: torch.Tensor, scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards (groups, group_size) -> (advantages of the same shape, zero-signal mask (groups,)).

    advantage = reward - group mean, divided by (group std + 1e-4) when `scale` (the sample
    standard deviation, n - 1 in the denominator). A group whose rewards are all equal has
    advantage 0 everywhere and is flagged: it carries no signal."""
    rewards = rewards.double()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (rewards.std(dim=1, keepdim=True) + _STD_EPS)
    zero_signal = rewards.amax(dim=1) == rewards.amin(dim=1)
    return centred.masked_fill(zero_signal[:, None], 0.0), zero_signal


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled token's log-probs:
    exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: unbiased, never negative)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_token_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, clip_eps: float,
                    kl_coef: float) -> torch.Tensor:
    """Per-token loss (B, T), zero where `mask` is 0: the PPO-clipped policy-gradient term of
    each sequence's advantage (B,), plus kl_coef x k3 to the reference. Sum it and divide by the
    number of trained tokens of the whole batch (token-level normalisation)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None].to(logp.dtype)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    loss = -surrogate
    if kl_coef:
        loss = loss + kl_coef * kl_k3(logp, ref_logp)
    return loss * mask


def token_logprobs(model: nn.Module, ids: torch.Tensor, temperature: float, vocab_limit: int,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probability (B, T - 1) of each next token ids[:, 1:] under the sampling distribution
    (logits over the first `vocab_limit` ids, / temperature), and its entropy when asked."""
    logits = model(ids[:, :-1])[..., :vocab_limit].float() / temperature
    log_probs = F.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, ids[:, 1:, None])[..., 0]
    entropy = -(log_probs.exp() * log_probs).sum(-1) if with_entropy else None
    return logp, entropy


def format_ok(text: str, finish_reason: str) -> bool:
    """An answer that ends with `#### N` and then stopped at <|end|>."""
    return finish_reason == "stop" and _FORMAT.search(text.strip()) is not None


# --------------------------------------------------------------------------------------------
# Tasks


def resolve_tasks(names: list[str], reward_model: str = "") -> dict[str, Task]:
    """The tasks `grpo.tasks` names, each `TASK` or `TASK:WEIGHT` ("chat": every verifiable
    built-in one). A task with no verifier (chit-chat) gives no reward to learn from unless a
    reward model scores the answers."""
    from lmforge.tasks import make_tasks

    known = make_tasks()
    chosen: dict[str, Task] = {}
    for name in task_weights(names):
        if name == CHAT_TASKS:
            chosen.update({n: t for n, t in known.items() if t.verifiable})
        elif name in known:
            chosen[name] = known[name]
        else:
            raise UserError(f"grpo.tasks: unknown task {name!r}; the tasks are {CHAT_TASKS}, "
                            f"{', '.join(known)}")
    unverified = [n for n, t in chosen.items() if not t.verifiable]
    if unverified and not reward_model:
        raise UserError(f"grpo.tasks: {unverified[0]} has no verifier (its check only asks for a "
                        "non-empty reply), so it gives no reward to learn from; drop it or set "
                        "grpo.reward_model")
    return chosen


def task_weights(names: list[str]) -> dict[str, float | None]:
    """`grpo.tasks` items -> {name: weight given, or None}."""
    out: dict[str, float | None] = {}
    for item in names:
        name, sep, weight = item.partition(":")
        try:
            value = float(weight) if sep else None
        except ValueError:
            value = -1.0
        if value is not None and not value > 0:
            raise UserError(f"grpo.tasks: {item!r} is not TASK or TASK:WEIGHT with a weight > 0")
        out[name] = value
    return out


def _task_weights(tasks: dict[str, Task], names: list[str]) -> list[float]:
    """Each task's share of the prompts: the weight grpo.tasks gives it, else its share in
    builtin:chat (equal for others). Prompts the policy always or never gets right give
    zero-signal groups, so weighting the tasks it half-masters puts the samples where the
    gradient is."""
    from lmforge.tasks import MIXTURE

    given = task_weights(names)
    return [given.get(name) or MIXTURE.get(name, 1.0 / len(tasks)) for name in tasks]


# --------------------------------------------------------------------------------------------
# Rollouts


@dataclasses.dataclass
class Rollouts:
    """One rollout batch of this rank, as the loss needs it: only the rows of groups with signal.
    JSON-able, so a checkpoint taken between the steps of one batch resumes on the same rollouts.

    ids: prompt + answer (+ <|end|> when the answer stopped there); start: the first answer index;
    mask: per answer token, 1 if the policy sampled it (0: forced calculator output);
    old_logp / ref_logp: per answer token, the policy's at sampling time and the reference's."""

    ids: list[list[int]]
    start: list[int]
    mask: list[list[int]]
    advantage: list[float]
    old_logp: list[list[float]]
    ref_logp: list[list[float]]
    tokens: int  # trained (masked-in) answer tokens of the whole batch, all ranks


@dataclasses.dataclass
class _Answer:
    ids: list[int]  # sampled and forced tokens, then <|end|> if it stopped there
    sampled: list[int]  # 1 per token the policy sampled
    text: str
    finish_reason: str


class GRPOObjective(Objective):
    """Rollout batches from the Engine; the clipped, token-normalised policy-gradient loss.

    The data position is (rollout batch index, steps taken on it); a checkpoint between two steps
    on one batch also holds that batch (`Rollouts`), which no longer can be sampled again."""

    def __init__(self, cfg: RunConfig, tasks: dict[str, Task], tokenizer: Any, par: Any,
                 reference: nn.Module | None = None) -> None:
        self.cfg, self.g, self.train = cfg, cfg.grpo, cfg.train
        self.tasks, self.tokenizer, self.par = tasks, tokenizer, par
        self.device, self.rank, self.dp = par.device, par.dp_rank, par.dp_size
        if self.g.prompts_per_step % self.dp:
            raise UserError(f"grpo.prompts_per_step={self.g.prompts_per_step} must be a multiple of "
                            f"the {self.dp} data-parallel ranks")
        self.local_rows = self.g.prompts_per_step // self.dp * self.g.group_size
        self.accum = math.ceil(self.local_rows / self.train.batch_size)
        self.reference = reference  # None: the policy with its LoRA adapters off
        self.end_id = tokenizer.special_tokens["<|end|>"]
        self.vocab_limit = tokenizer.vocab_size
        self.autocast = autocast_for(cfg, self.device)
        self.batch, self.epoch, self.micro = 0, 0, 0
        self.rollouts: Rollouts | None = None
        self.last_metrics: dict[str, float] = {}
        self._last_tokens = 0
        self.model: nn.Module | None = None
        self._engine: Any = None
        self._scorer = load_scorer(self.g.reward_model) if self.g.reward_model else None
        self._held_out = held_out_questions(tasks, self.g.eval_examples)
        self.select_by = "pass_at_1" if self.g.select_best else None

    @property
    def tokens_per_step(self) -> int:  # type: ignore[override]
        """Answer tokens the latest step trained on (all ranks)."""
        return self._last_tokens

    def attach(self, model: nn.Module, par: Any) -> None:
        self.model = model

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    # ---- the batches

    def next_batch(self) -> Any:
        if self.micro == 0 and self.rollouts is None:
            self.rollouts = self._rollout_batch(self.batch)
        assert self.rollouts is not None
        r, bs = self.rollouts, self.train.batch_size
        rows = list(range(self.micro * bs, min((self.micro + 1) * bs, len(r.ids))))
        self.micro += 1
        if self.micro == self.accum:  # the step's last micro-batch: the batch was used once more
            self.micro, self.epoch = 0, self.epoch + 1
            self._last_tokens = r.tokens
            if self.epoch == self.g.epochs_per_batch:
                self.batch, self.epoch, self.rollouts = self.batch + 1, 0, None
        return _collate(r, rows, self.tokenizer.pad_id, self.device)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        ids, mask, old, ref, adv, tokens = batch
        if ids is None:  # no trained row in this micro-batch: a zero loss through every parameter
            return model(torch.zeros(1, 1, dtype=torch.long, device=self.device)).sum() * 0.0
        logp, _ = token_logprobs(model, ids, self.g.temperature, self.vocab_limit)
        per_token = grpo_token_loss(logp, old, ref, adv, mask, self.g.clip_eps, self.g.kl_coef)
        # The loop averages micro-batches and ranks; scaled so that comes to sum / tokens.
        return per_token.sum() * (self.accum * self.dp / tokens)

    def step_metrics(self) -> dict[str, float]:
        return self.last_metrics

    def _rollout_batch(self, index: int) -> Rollouts:
        """Sample, reward and score this rank's share of rollout batch `index`."""
        examples, seeds = self._prompts(index)
        answers = self._sample(examples, seeds)
        G = self.g.group_size
        flat = [(e, a) for e, group in zip(examples, answers, strict=True) for a in group]
        rewards = torch.tensor(self._rewards(flat), dtype=torch.float64).view(len(examples), G)
        advantages, zero_signal = group_advantages(rewards, self.g.scale_rewards)
        prompts = [self._prompt_ids(e) for e in examples]
        rows = [prompts[i // G] + a.ids for i, (_, a) in enumerate(flat)]
        starts = [len(prompts[i // G]) for i in range(len(flat))]
        old, ref, entropy = self._score_rows(rows, starts)
        keep = [i for i in range(len(flat)) if not zero_signal[i // G]]
        tokens = sum(sum(flat[i][1].sampled) for i in keep)
        n_answer = sum(len(a.ids) for _, a in flat)
        totals = self.par.all_reduce(torch.tensor([
            float(tokens), float(rewards.sum()), float(len(flat)), float(n_answer),
            float(sum(kl_k3(o, r).sum() for o, r in zip(old, ref, strict=True))),
            float(sum(e.sum() for e in entropy)), float(zero_signal.sum()), float(len(examples)),
        ], dtype=torch.float64), "sum").tolist()
        self.last_metrics = {
            "reward_mean": totals[1] / totals[2], "kl": totals[4] / max(totals[3], 1),
            "entropy": totals[5] / max(totals[3], 1), "answer_tokens": totals[3] / totals[2],
            "zero_signal_groups": totals[6] / totals[7],
        }
        return Rollouts(
            ids=[rows[i] for i in keep], start=[starts[i] for i in keep],
            mask=[flat[i][1].sampled for i in keep], advantage=[float(advantages.view(-1)[i]) for i in keep],
            old_logp=[old[i].tolist() for i in keep], ref_logp=[ref[i].tolist() for i in keep],
            tokens=int(totals[0]),
        )

    def _prompts(self, index: int) -> tuple[list[Example], list[int]]:
        """This rank's prompts of rollout batch `index` and each one's sampling seed."""
        rng = random.Random(f"grpo/{self.train.seed}/{index}")
        names = rng.choices(list(self.tasks), weights=_task_weights(self.tasks, self.g.tasks), k=self.g.prompts_per_step)
        examples: list[Example] = []
        for name in dict.fromkeys(names):  # each task once, in first-drawn order
            examples += self.tasks[name].generate("train", rng.randrange(2**31), names.count(name))
        base = rng.randrange(2**40)
        seeds = [base + i * self.g.group_size for i in range(len(examples))]  # sample j: seed + j
        return examples[self.rank::self.dp], seeds[self.rank::self.dp]

    def _prompt_ids(self, example: Example) -> list[int]:
        from lmforge.chat import render_prompt

        ids = render_prompt(self.tokenizer, example.prompt)
        if len(ids) >= self.cfg.model.max_seq_len:
            raise UserError(f"a {example.task} prompt of {len(ids)} tokens leaves no room to answer in "
                            f"model.max_seq_len={self.cfg.model.max_seq_len}")
        return ids

    def _generating(self) -> contextlib.AbstractContextManager:
        """The Engine over the live policy (built once), the model back in training mode after."""
        from lmforge.align.heldout import generating, live_engine

        assert self.model is not None
        if self._engine is None:
            self._engine = live_engine(self.model, self.tokenizer, max(self.local_rows, 1), self.g.compile,
                                       self.autocast)
            # An answer ends at <|end|> only: the Engine leaves the stop token out of what it
            # returns, and the loss must know which one the policy chose.
            self._engine.stop_ids = {self.end_id}
        return generating(self._engine, self.model, self.autocast)

    def _sample(self, examples: list[Example], seeds: list[int]) -> list[list[_Answer]]:
        from lmforge.engine import SamplingParams

        with self._generating() as engine:
            requests = [engine.submit(self._prompt_ids(e), SamplingParams(
                max_tokens=self.g.max_new_tokens, temperature=self.g.temperature, seed=seed,
                n=self.g.group_size), stream=False) for e, seed in zip(examples, seeds, strict=True)]
            while engine.step():
                pass
        return [_answers(request, self.g.group_size, self.end_id) for request in requests]

    def _rewards(self, rows: list[tuple[Example, _Answer]]) -> list[float]:
        if self._scorer is not None:
            base = [float(s) for s in self._scorer.score([e.prompt for e, _ in rows], [a.text for _, a in rows])]
        else:
            base = [self.tasks[e.task].reward(e, a.text) for e, a in rows]
        return [b + self.g.format_reward * format_ok(a.text, a.finish_reason)
                for b, (_, a) in zip(base, rows, strict=True)]

    @torch.no_grad()
    def _score_rows(self, rows: list[list[int]], starts: list[int]) -> tuple[list[torch.Tensor], ...]:
        """Per answer token: the policy's log-prob (the ratio's denominator), the reference's,
        and the policy's entropy; micro-batches of train.batch_size rows."""
        assert self.model is not None
        old, ref, entropy = [], [], []
        was_training = self.model.training
        self.model.eval()
        try:
            for lo in range(0, len(rows), self.train.batch_size):
                chunk, first = rows[lo:lo + self.train.batch_size], starts[lo:lo + self.train.batch_size]
                ids = _pad(chunk, self.tokenizer.pad_id, self.device)
                with self.autocast():
                    logp, ent = token_logprobs(self.model, ids, self.g.temperature, self.vocab_limit, True)
                    with self._as_reference() as reference:
                        ref_logp, _ = token_logprobs(reference, ids, self.g.temperature, self.vocab_limit)
                assert ent is not None
                for k, (row, s) in enumerate(zip(chunk, first, strict=True)):
                    span = slice(s - 1, len(row) - 1)  # logits at p predict token p + 1
                    old.append(logp[k, span].cpu())
                    ref.append(ref_logp[k, span].cpu())
                    entropy.append(ent[k, span].cpu())
        finally:
            self.model.train(was_training)
        return old, ref, entropy

    @contextlib.contextmanager
    def _as_reference(self) -> Iterator[nn.Module]:
        """The reference model: the frozen starting model, or the policy with its LoRA adapters
        switched off (their scale set to 0 for the duration)."""
        if self.reference is not None:
            yield self.reference
            return
        from lmforge.finetune.lora import lora_layers

        assert self.model is not None
        layers = list(lora_layers(self.model).values())
        scales = [layer.scale for layer in layers]
        for layer in layers:
            layer.scale = 0.0
        try:
            yield self.model
        finally:
            for layer, scale in zip(layers, scales, strict=True):
                layer.scale = scale

    # ---- evaluation

    def evaluate(self, model: nn.Module, par: Any, autocast: Autocast) -> dict[str, float]:
        """pass@1: greedy answers to the fixed held-out questions, checked by their task."""
        from lmforge.align.heldout import pass_at_1

        with self._generating() as engine:
            return {"pass_at_1": pass_at_1(engine, self._held_out, self.tasks, self._prompt_ids,
                                           self.g.max_new_tokens, par)}

    # ---- resume

    def state_dict(self) -> dict[str, Any]:
        return {"batch": self.batch, "epoch": self.epoch,
                "rollouts": dataclasses.asdict(self.rollouts) if self.rollouts is not None else None,
                "last_metrics": self.last_metrics, "last_tokens": self._last_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch, self.epoch, self.micro = int(state["batch"]), int(state["epoch"]), 0
        self.rollouts = Rollouts(**state["rollouts"]) if state.get("rollouts") else None
        self.last_metrics = dict(state.get("last_metrics", {}))
        self._last_tokens = int(state.get("last_tokens", 0))


def load_scorer(path: str) -> Any:
    """The reward model of `grpo.reward_model`: `.score(prompts, answers) -> list[float]`, where a
    prompt is the conversation asked (a list of {role, content}) and an answer the reply's text."""
    if not Path(path).exists():
        raise UserError(f"grpo.reward_model={path}: no such checkpoint")
    from lmforge.align.reward import load_reward_model

    return load_reward_model(path)


def _answers(request: Any, n: int, end_id: int) -> list[_Answer]:
    """A request's n answers from its events: a token was sampled unless its event says it was
    forced (a calculator result); "stop" means the policy sampled <|end|>."""
    answers = [_Answer([], [], "", "") for _ in range(n)]
    for event in request:
        a = answers[event.index]
        a.text += event.text
        sampled = 0 if event.forced else 1
        a.ids += event.token_ids
        a.sampled += [sampled] * len(event.token_ids)
        if event.finish_reason:
            a.finish_reason = event.finish_reason
            if event.finish_reason == "stop":
                a.ids.append(end_id)
                a.sampled.append(1)
    return answers


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    ids = torch.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    return ids.to(device)


def _collate(r: Rollouts, rows: list[int], pad_id: int, device: torch.device) -> tuple:
    """(ids, mask, old, ref, advantages, tokens) of the given rows, per-token tensors aligned with
    the next-token log-probs (B, T - 1); (None, ..., tokens) for no rows."""
    if not rows:
        return None, None, None, None, None, r.tokens
    ids = _pad([r.ids[i] for i in rows], pad_id, device)
    shape = (len(rows), ids.shape[1] - 1)
    mask, old, ref = torch.zeros(shape), torch.zeros(shape), torch.zeros(shape)
    for k, i in enumerate(rows):
        span = slice(r.start[i] - 1, r.start[i] - 1 + len(r.mask[i]))
        mask[k, span] = torch.tensor(r.mask[i], dtype=torch.float32)
        old[k, span] = torch.tensor(r.old_logp[i])
        ref[k, span] = torch.tensor(r.ref_logp[i])
    adv = torch.tensor([r.advantage[i] for i in rows])
    return ids, mask.to(device), old.to(device), ref.to(device), adv.to(device), r.tokens


# --------------------------------------------------------------------------------------------
# The stage


def load_reference(base: BaseRef, cfg: RunConfig, device: torch.device) -> nn.Module | None:
    """The KL reference: None when the policy with its adapters off is the base (LoRA training
    adapters only), else a frozen copy of the base (costs one more copy of the weights)."""
    from lmforge.checkpoint import load_model

    if cfg.lora.rank and not (cfg.lora.train_embeddings or cfg.lora.train_head):
        return None
    reference = load_model(base.checkpoint, device=device).eval()
    return reference.requires_grad_(False)


def grpo(cfg: RunConfig, base: BaseRef, tasks: dict[str, Task], run_dir: str | Path,
         resume_from: Path | None = None, time_budget_s: float | None = None, par: Any = None,
         clock: Callable[[], float] = time.perf_counter,
         report: Callable[[str], None] = print) -> TrainResult:
    """Train the base checkpoint with GRPO on `tasks`, writing metrics and checkpoints into `run_dir`."""
    from lmforge.distributed import init_parallel
    from lmforge.finetune.lora import describe_trainable
    from lmforge.finetune.sft import chat_tokenizer, load_base, lora_writer, run_recorded

    run_dir = Path(run_dir)
    tokenizer, tokenizer_dir = chat_tokenizer(base, "GRPO")
    owns_par = par is None
    par = par or init_parallel(cfg)
    try:
        if par.name not in ("none", "ddp"):
            raise UserError(f"train.parallel={par.name}: grpo runs on one process or ddp (every rank "
                            "samples with its full replica)")
        seed_everything(cfg.train.seed)
        model = load_base(base, cfg)
        objective = GRPOObjective(cfg, tasks, tokenizer, par, load_reference(base, cfg, par.device))

        loop = TrainLoop(objective, model, cfg, run_dir, par, resume_from=resume_from,
                         time_budget_s=time_budget_s, clock=clock, tokenizer_dir=tokenizer_dir,
                         write_weights=lora_writer(model, base, cfg))

        def log_start() -> None:  # where the curve starts: the base's pass@1 (the loop's when selecting)
            if resume_from is None and not objective.select_by:
                loop.metrics.log({"step": 0, **objective.evaluate(loop.model, par, loop.autocast)})

        kind = f"LoRA rank {cfg.lora.rank}" if cfg.lora.rank else "full fine-tuning"
        return run_recorded(loop, cfg, base, run_dir, par, [
            f"grpo: {kind}: {describe_trainable(model)}",
            f"grpo: tasks {', '.join(tasks)}; {cfg.grpo.prompts_per_step} prompts x "
            f"{cfg.grpo.group_size} answers per rollout batch, {cfg.grpo.epochs_per_batch} step(s) each"],
            report, before=log_start)
    finally:
        if owns_par:
            par.shutdown()


def run_grpo(cfg: RunConfig, checkpoint: str | Path, run_dir: str | Path, resume: bool = False) -> TrainResult:
    """GRPO from `checkpoint` into `run_dir` on the tasks of cfg.grpo.tasks (the lifecycle's
    entry point; `lmforge grpo` adds its defaults and flags). The model and tokenizer sections must
    be the checkpoint's; `resume` continues the run's newest checkpoint from the same base."""
    from lmforge.finetune.stages import GRPO, run_stage

    return run_stage(GRPO, cfg, checkpoint, run_dir, resume)



__all__ = ["CHAT_TASKS", "GRPOObjective", "GRPO_GUARD_DEFAULTS", "GRPO_TRAIN_DEFAULTS", "Rollouts",
           "format_ok", "group_advantages", "grpo", "grpo_token_loss", "kl_k3",
           "load_reference", "load_scorer", "resolve_tasks", "run_grpo", "task_weights", "token_logprobs"]
