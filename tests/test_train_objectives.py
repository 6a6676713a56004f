"""The shared training loop runs stages other than pre-training: a second objective (next-token
loss under a loss mask, the shape of SFT batches) trains on `TrainLoop` unchanged, computes the
loss the mask defines (truth: cross-entropy of the logits over the masked positions, computed
here by hand), resumes bit-exactly after a signal (truth: the uninterrupted run), and trains only
the parameters the objective names. Pre-training leaves its config untouched."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from train_fixtures import losses, make_shards, read_metrics, tiny_config

from lmforge.distributed import init_parallel
from lmforge.model import Transformer
from lmforge.train.checkpoint import CheckpointManager
from lmforge.train.loop import Objective, TrainLoop, seed_everything
from lmforge.train.pretrain import pretrain

B, T = 4, 16


class MaskedNextToken(Objective):
    """Next-token loss counted only where `mask` is true (odd positions here): token ids plus a
    loss mask, as SFT's batches are. Batch i is drawn from a generator seeded with i, so the data
    position (`state_dict`) is one integer."""

    tokens_per_step = B * T

    def __init__(self, vocab_size: int, only: str | None = None) -> None:
        self.vocab_size, self.only, self.position = vocab_size, only, 0

    def trainable_parameters(self, model: torch.nn.Module):
        if self.only is None:
            return model.parameters()
        return [p for name, p in model.named_parameters() if name == self.only]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(1000 + index)
        ids = torch.randint(0, self.vocab_size // 4, (B, T + 1), generator=g)  # a skewed, learnable distribution
        mask = (torch.arange(T) % 2 == 1).expand(B, T)
        return ids[:, :-1], ids[:, 1:], mask

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.position += 1
        return self.batch(self.position - 1)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y, mask = batch
        return model.loss(x, torch.where(mask, y, -100))

    def evaluate(self, model, par, autocast) -> dict[str, float]:
        with torch.no_grad(), autocast():
            return {"val_loss": float(self.loss(model, self.batch(-1)))}

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


def _loop(run_dir: Path, *overrides: str, resume_from: Path | None = None, only: str | None = None) -> TrainLoop:
    cfg = tiny_config("train.max_steps=8", "train.checkpoint_every=4", "train.eval_every=4", *overrides)
    seed_everything(cfg.train.seed)
    model = Transformer(cfg.model)
    return TrainLoop(MaskedNextToken(cfg.model.vocab_size, only), model, cfg, run_dir,
                     init_parallel(cfg), resume_from=resume_from)


def test_a_second_objective_trains_on_the_loop_with_its_own_loss(tmp_path):
    loop = _loop(tmp_path / "run")
    # The truth for step 1: masked cross-entropy from the initial weights' logits, by hand.
    x, y, mask = loop.objective.batch(0)
    with torch.no_grad():
        logits = loop.model(x)
    expected = F.cross_entropy(logits[mask], y[mask])
    result = loop.run()
    records = read_metrics(tmp_path / "run")
    assert result.step == 8
    assert losses(tmp_path / "run")[1] == pytest.approx(float(expected), abs=1e-6)
    assert losses(tmp_path / "run")[8] < losses(tmp_path / "run")[1]  # it learns the skewed distribution
    assert [r["step"] for r in records if "val_loss" in r and "event" not in r] == [4, 8]


def test_a_second_objective_resumes_exactly_after_a_signal(tmp_path):
    reference = _loop(tmp_path / "ref").run()
    first = _loop(tmp_path / "run", "debug.inject=sigterm@5").run()
    assert first.stopped_by_signal and first.step == 5
    latest = CheckpointManager(tmp_path / "run", 3).latest()
    assert latest is not None and latest.name.endswith("05")
    resumed = _loop(tmp_path / "run", resume_from=latest).run()
    assert resumed.step == reference.step == 8
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")


def test_only_the_parameters_the_objective_names_train(tmp_path):
    loop = _loop(tmp_path / "run", "train.max_steps=3", only="norm.weight")
    before = {k: v.clone() for k, v in loop.model.state_dict().items()}
    loop.run()
    after = loop.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"norm.weight"}


def test_pretraining_never_changes_its_config(tmp_path):
    """The loop keeps the max_steps and warmup a time budget chooses in its own copy (and in the
    checkpoints), so callers need no defensive copy of the config."""
    shards = make_shards(tmp_path, n_docs=40)
    ticks = itertools.count()
    cfg = tiny_config("train.time_budget=20s", "train.max_steps=100000", "train.warmup_steps=50",
                      "train.eval_every=100000", "train.checkpoint_every=100000")
    before = cfg.to_dict()
    result = pretrain(cfg, shards, tmp_path / "run", clock=lambda: next(ticks) * 0.05)
    assert any(r.get("event") == "budget" for r in read_metrics(tmp_path / "run"))
    assert cfg.to_dict() == before
    from lmforge.checkpoint import read_config

    saved = read_config(result.checkpoint)
    assert saved.train.max_steps == result.max_steps != before["train"]["max_steps"]
