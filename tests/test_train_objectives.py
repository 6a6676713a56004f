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


class ScriptedScore(MaskedNextToken):
    """MaskedNextToken whose held-out score is a fake scorer: a fixed value per evaluated step."""

    select_by = "pass_at_1"

    def __init__(self, vocab_size: int, scores: dict[int, float]) -> None:
        super().__init__(vocab_size)
        self.scores, self.evaluated = scores, 0

    def evaluate(self, model, par, autocast) -> dict[str, float]:
        step = self.position  # one micro-batch per step: the data position is the step
        self.evaluated += 1
        return {**super().evaluate(model, par, autocast), "pass_at_1": self.scores[step]}


def _selecting_loop(run_dir: Path, scores: dict[int, float], *overrides: str,
                    resume_from: Path | None = None) -> TrainLoop:
    cfg = tiny_config("train.max_steps=8", "train.checkpoint_every=8", "train.eval_every=2",
                      "train.keep_last=1", *overrides)
    seed_everything(cfg.train.seed)
    return TrainLoop(ScriptedScore(cfg.model.vocab_size, scores), Transformer(cfg.model), cfg, run_dir,
                     init_parallel(cfg), resume_from=resume_from)


@pytest.mark.parametrize(("scores", "best"), [
    ({0: 0.30, 2: 0.35, 4: 0.50, 6: 0.45, 8: 0.40}, 4),  # the peak mid-run, not the last step
    ({0: 0.50, 2: 0.40, 4: 0.50, 6: 0.20, 8: 0.45}, 0),  # nothing beats the start (a tie keeps the earlier)
    ({0: 0.10, 2: 0.20, 4: 0.30, 6: 0.40, 8: 0.60}, 8),
])
def test_the_run_selects_the_checkpoint_with_the_best_held_out_score(tmp_path, scores, best):
    from lmforge.checkpoint import read_selected, resolve_checkpoint

    run = tmp_path / "run"
    loop = _selecting_loop(run, scores)
    loop.run()
    assert loop.objective.evaluated == len(scores)  # step 0 (the starting model) is scored too
    assert read_selected(run / "checkpoints") == {"step": best, "metric": "pass_at_1", "value": scores[best]}
    # Loading the run directory gives the selected step, kept though keep_last=1 keeps only the last.
    assert resolve_checkpoint(run) == run / "checkpoints" / f"step_{best:08d}"
    assert {step for step, _ in CheckpointManager(run, 1).complete()} == {best, 8}
    # The selected checkpoint holds the weights as they were at that step (not the last ones).
    from lmforge.checkpoint import load_model
    selected = load_model(run).state_dict()
    last = load_model(run / "checkpoints" / "step_00000008").state_dict()
    assert (best == 8) == all(torch.equal(selected[k], last[k]) for k in last)


def test_a_resumed_run_keeps_competing_with_the_best_before_the_stop(tmp_path):
    from lmforge.checkpoint import read_selected

    scores = {0: 0.1, 2: 0.6, 4: 0.3, 6: 0.5, 8: 0.4}
    run = tmp_path / "run"
    assert _selecting_loop(run, scores, "debug.inject=sigterm@5").run().stopped_by_signal
    resumed = _selecting_loop(run, scores, resume_from=CheckpointManager(run, 1).latest())
    resumed.run()
    assert read_selected(run / "checkpoints")["step"] == 2  # 0.5 and 0.4 after the resume lose to 0.6


def test_a_time_budget_sizes_a_run_no_longer_than_the_objectives_limit(tmp_path):
    """A budget worth ~100 steps sizes the run to the objective's max_budget_steps (DPO: its
    dpo.max_epochs over the pairs); without a limit it takes what the budget allows."""

    class Clock:
        now = 0.0

        def __call__(self) -> float:
            return self.now

    class Timed(MaskedNextToken):
        def next_batch(self):
            clock.now += 1.0  # one second per step
            return super().next_batch()

    for limit, expected in ((12, 12), (None, None)):
        clock = Clock()
        cfg = tiny_config("train.max_steps=8", "train.checkpoint_every=1000", "train.eval_every=1000",
                          "train.warmup_steps=1")
        seed_everything(cfg.train.seed)
        objective = Timed(cfg.model.vocab_size)
        objective.max_budget_steps = limit
        loop = TrainLoop(objective, Transformer(cfg.model), cfg, tmp_path / f"run{limit}", init_parallel(cfg),
                         time_budget_s=100.0, clock=clock)
        result = loop.run()
        sized = [r["max_steps"] for r in read_metrics(loop.run_dir) if r.get("event") == "budget"]
        assert sized, "the budget sized the run (else this test proves nothing)"
        if expected is None:
            assert result.step > 80  # what the budget allows
        else:
            assert result.step == expected and max(sized) == expected  # not the configured 8, nor ~95
