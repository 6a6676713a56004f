"""Reward models: a transformer with a scalar head, trained on preference pairs.

The RLHF reward model (Ouyang et al. 2022): the policy's transformer, its LM head unused, and a
linear `score` head on the final hidden state of the conversation's last token (<|end|> of the
answer; the last non-pad token of a right-padded row). Trained with the Bradley-Terry loss

    -log sigmoid(score(prompt, chosen) - score(prompt, rejected))

so that score differences are log-odds of preference. Only differences mean anything: a constant
added to every score changes nothing (the head has no bias). Logged: `loss` and the batch's
pairwise `accuracy` per step; `val_loss` and the held-out pairwise `accuracy` at evaluations.

A reward model's checkpoint is a normal training checkpoint whose model.safetensors holds
`backbone.*` (the transformer's tensors) and `score_head.weight`, plus `reward_model.json`
({"format": "lmforge-reward-model", "version": 1, "base": {...}}); `lmforge.load_model` and every
command that wants a policy refuse it in one line, and `load_reward_model` reads it:

    rm = load_reward_model("runs/rm")
    rm.score([[{"role": "user", "content": "2+2?"}]] * 2, ["4", "5"])   # -> [1.7, -0.9]
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.align.pairs import RenderedPair, render_answer
from lmforge.atomic import atomic_write_json
from lmforge.checkpoint import REWARD_MODEL_FILE
from lmforge.config import RunConfig
from lmforge.errors import UserError
from lmforge.finetune.data import bucket_batches
from lmforge.finetune.lora import BaseRef
from lmforge.train.loop import Autocast, Objective, TrainLoop, TrainResult, seed_everything

REWARD_FORMAT = "lmforge-reward-model"
REWARD_VERSION = 1
# What `lmforge reward train` starts from: as DPO, a trained model moved a little; the new head
# starts at zero (every score 0, the loss log 2).
REWARD_TRAIN_DEFAULTS: dict[str, Any] = dict(
    max_steps=200, batch_size=8, lr=1e-4, warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0,
    eval_every=25, eval_batches=10, checkpoint_every=50, sample_every=0,
)


class RewardModel(nn.Module):
    """`backbone` (a Transformer) and a scalar `score` head on its last real token.
    `tokenizer` (set by load_reward_model) is what `score` renders conversations with."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.cfg = backbone.cfg
        param = next(backbone.parameters())
        self.score_head = nn.Linear(backbone.cfg.d_model, 1, bias=False, device=param.device, dtype=param.dtype)
        nn.init.zeros_(self.score_head.weight)
        self.tokenizer: Any = None

    @property
    def layers(self) -> nn.ModuleDict:
        """The backbone's blocks (what train.compile compiles)."""
        return self.backbone.layers

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T), right-padded, and each row's length -> scores (B,) in fp32."""
        h = self.backbone.norm(self.backbone.hidden_states(idx))
        last = h[torch.arange(idx.shape[0], device=idx.device), lengths - 1]
        return self.score_head(last).squeeze(-1).float()

    def score(self, prompts: list[list[dict]], answers: list[str]) -> list[float]:
        """The score of each answer to its prompt (chat messages ending before the answer)."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        return self.score_rows([render_answer(self.tokenizer, list(p), [{"role": "assistant", "content": a}])[0]
                                for p, a in zip(prompts, answers, strict=True)])

    @torch.no_grad()
    def score_rows(self, rows: Sequence[Sequence[int]], batch_size: int = 16) -> list[float]:
        """Scores of rendered conversations (token ids). One longer than the context is cut from
        the left: the score reads its end."""
        context = self.cfg.max_seq_len
        rows = [list(r)[-context:] for r in rows]
        was_training = self.training
        self.eval()
        out = [0.0] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        for start in range(0, len(order), batch_size):
            index = order[start:start + batch_size]
            x, lengths = pad_rows([rows[i] for i in index], self.tokenizer.pad_id)
            device = next(self.parameters()).device
            for i, s in zip(index, self(x.to(device), lengths.to(device)).tolist(), strict=True):
                out[i] = s
        self.train(was_training)
        return out


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, longest), lengths (B,)): rows right-padded with pad_id."""
    lengths = torch.tensor([len(r) for r in rows])
    x = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return x, lengths


# --------------------------------------------------------------------------------------------
# Training


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log sigmoid(chosen - rejected)."""
    return -F.logsigmoid(chosen - rejected)


class RewardObjective(Objective):
    """Batches of pairs (chosen rows, then rejected rows; whole conversations, right-padded) and
    the Bradley-Terry loss of their scores. Data position (epoch, batch index), as DPO's."""

    def __init__(self, cfg: RunConfig, train: list[RenderedPair], val: list[RenderedPair], pad_id: int,
                 par: Any) -> None:
        from lmforge.train.pretrain import batch_geometry

        self.train, self.par, self.device = cfg.train, par, par.device
        self.rank, self.dp = par.dp_rank, par.dp_size
        _, self.accum, _ = batch_geometry(cfg, par.dp_size)
        if len(train) < self.dp:
            raise UserError(f"reward: {len(train)} training pairs fit the context; need at least {self.dp}")
        self.pairs, self.val_pairs, self.pad_id = train, val, pad_id
        self.epoch, self.index = 0, 0
        self._batches: list[list[int]] | None = None
        self._recent: collections.deque[int] = collections.deque(maxlen=self.accum)
        self._correct: collections.deque[torch.Tensor] = collections.deque(maxlen=self.accum)

    @property
    def tokens_per_step(self) -> int:  # type: ignore[override]
        return sum(self._recent)

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """All but an untied LM head, which a reward model never uses."""
        unused = {id(p) for p in model.backbone.lm_head.parameters()} if model.backbone.lm_head is not None else set()
        return [p for p in model.parameters() if id(p) not in unused]

    def _epoch_batches(self) -> list[list[int]]:
        if self._batches is None:
            longest = [p.longest for p in self.pairs]
            batches = bucket_batches(longest, self.train.batch_size * self.dp, self.train.seed + self.epoch)
            self._batches = [b for b in batches if len(b) >= self.dp]
        return self._batches

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.index >= len(self._epoch_batches()):
            self.epoch, self.index, self._batches = self.epoch + 1, 0, None
        batch = self._epoch_batches()[self.index]
        self.index += 1
        self._recent.append(sum(len(self.pairs[i].chosen[0]) + len(self.pairs[i].rejected[0]) for i in batch))
        return self._tensors([self.pairs[i] for i in batch[self.rank::self.dp]])

    def _tensors(self, pairs: list[RenderedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = pad_rows([p.chosen[0] for p in pairs] + [p.rejected[0] for p in pairs], self.pad_id)
        return x.to(self.device), lengths.to(self.device)

    def _scores(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        scores = model(*batch)
        n = scores.shape[0] // 2
        return scores[:n], scores[n:]

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = self._scores(model, batch)
        wins = (chosen > rejected).sum().detach()
        self._correct.append(torch.stack([wins, torch.full_like(wins, len(chosen))]))
        return bradley_terry_loss(chosen, rejected).mean()

    def step_metrics(self) -> dict[str, float]:
        if not self._correct:
            return {}
        totals = self.par.all_reduce(torch.stack(list(self._correct)).sum(0).double(), "sum")
        return {"accuracy": float(totals[0] / totals[1].clamp(min=1))}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, par: Any, autocast: Autocast) -> dict[str, float]:
        """Loss and pairwise accuracy on the held-out pairs (the same batches every time)."""
        if not self.val_pairs:
            return {}
        batches = bucket_batches([p.longest for p in self.val_pairs], self.train.batch_size, seed=0)
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, right, pairs
        for batch in batches[: self.train.eval_batches][self.rank::self.dp]:
            with autocast():
                chosen, rejected = self._scores(model, self._tensors([self.val_pairs[i] for i in batch]))
            totals += torch.stack([bradley_terry_loss(chosen, rejected).sum().double(),
                                   (chosen > rejected).sum().double(), torch.tensor(float(len(chosen)))
                                   .to(self.device, torch.float64)])
        model.train(was_training)
        totals = par.all_reduce(totals, "sum")
        n = totals[2].clamp(min=1)
        return {"val_loss": float(totals[0] / n), "accuracy": float(totals[1] / n)}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.index, self._batches = int(state["epoch"]), int(state["index"]), None


def train_reward_model(cfg: RunConfig, base: BaseRef, run_dir: str | Path, resume_from: Path | None = None,
                       time_budget_s: float | None = None, par: Any = None,
                       clock: Callable[[], float] = time.perf_counter,
                       report: Callable[[str], None] = print) -> TrainResult:
    """Train a reward model from the base checkpoint on the pairs of cfg.reward.data."""
    from lmforge.align.dpo import prepare_pairs
    from lmforge.checkpoint import load_model, write_model_files
    from lmforge.distributed import init_parallel
    from lmforge.finetune.lora import describe_trainable
    from lmforge.finetune.sft import chat_tokenizer, run_recorded
    from lmforge.train.pretrain import batch_geometry

    if cfg.lora.rank:
        raise UserError("lora.rank: a reward model trains in full (its new score head and the "
                        "transformer); set lora.rank=0")
    run_dir = Path(run_dir)
    tokenizer, tokenizer_dir = chat_tokenizer(base, "reward training")
    owns_par = par is None
    par = par or init_parallel(cfg)
    try:
        seed_everything(cfg.train.seed)
        backbone = load_model(base.checkpoint, device=par.device)
        context, _, _ = batch_geometry(cfg, par.dp_size)
        # A row here is the whole conversation (no shifted targets): at most `context` tokens.
        pairs = prepare_pairs(cfg, cfg.reward, backbone, tokenizer, base, run_dir, par, context - 1)
        model = RewardModel(backbone).train()
        objective = RewardObjective(cfg, pairs.train, pairs.val, tokenizer.pad_id, par)

        def write_reward_model(state: dict, ckpt_cfg: RunConfig, directory: Path, tok: Path | None) -> None:
            write_model_files(state, ckpt_cfg, directory, tok)
            atomic_write_json(directory / REWARD_MODEL_FILE, {"format": REWARD_FORMAT, "version": REWARD_VERSION,
                                                              "base": base.to_json()})

        loop = TrainLoop(objective, model, cfg, run_dir, par, resume_from=resume_from,
                         time_budget_s=time_budget_s, clock=clock, tokenizer_dir=tokenizer_dir,
                         write_weights=write_reward_model)
        return run_recorded(loop, cfg, base, run_dir, par, [
            f"reward: Bradley-Terry on a score head: {describe_trainable(model)}",
            *(f"reward: {line}" for line in pairs.describe())], report)
    finally:
        if owns_par:
            par.shutdown()


# --------------------------------------------------------------------------------------------
# Loading


def is_reward_model(directory: str | Path) -> bool:
    return (Path(directory) / REWARD_MODEL_FILE).is_file()


def load_reward_model(path: str | Path, device: torch.device | str = "cpu") -> RewardModel:
    """A reward model checkpoint (or a reward run directory's newest one), in eval mode, with its
    tokenizer; anything else is a UserError."""
    from lmforge.checkpoint import (
        WEIGHTS_FILE,
        check_finite,
        check_state,
        load_state,
        read_config,
        resolve_checkpoint,
    )
    from lmforge.model import Transformer
    from lmforge.tokenizer import load_tokenizer

    directory = resolve_checkpoint(path)
    if not is_reward_model(directory):
        raise UserError(f"{directory} is not a reward model (it has no {REWARD_MODEL_FILE}); "
                        "train one with `lmforge reward train`")
    if not (directory / "tokenizer").is_dir():
        raise UserError(f"{directory} has no tokenizer/ directory; a reward model renders conversations with it")
    cfg = read_config(directory)
    state = load_state(directory / WEIGHTS_FILE)
    with torch.device("meta"):
        model = RewardModel(Transformer(cfg.model))
    check_state(model, state, str(directory / WEIGHTS_FILE))
    check_finite(state, str(directory / WEIGHTS_FILE))
    model.load_state_dict(state, assign=True)
    model.backbone.init_buffers(device="cpu")
    model.tokenizer = load_tokenizer(directory / "tokenizer")
    return model.to(device).eval()


__all__ = ["REWARD_TRAIN_DEFAULTS", "RewardModel", "RewardObjective", "bradley_terry_loss", "is_reward_model",
           "load_reward_model", "pad_rows", "train_reward_model"]
