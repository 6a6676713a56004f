"""--time-budget with a fake clock: the run fits the budget, uses most of it, and its learning
rate never jumps when max_steps is re-estimated (the truth: a continuous curve, whatever speed
changes the machine goes through)."""

from __future__ import annotations

import pytest
from train_fixtures import make_shards, read_metrics, tiny_config

from lmforge.config import TrainConfig
from lmforge.train.pretrain import Trainer, pretrain
from lmforge.train.schedule import decay_progress, lr_multiplier

BUDGET_S = 100.0


class FakeClock:
    """Seconds that pass only when a training step runs, by `seconds_per_step(now)`."""

    def __init__(self, seconds_per_step):
        self.now = 0.0
        self.seconds_per_step = seconds_per_step

    def __call__(self) -> float:
        return self.now


PROFILES = {
    "speeds-up": lambda now: 0.4 if now < 30 else 0.2,   # a neighbour's job ends
    "slows-down": lambda now: 0.2 if now < 50 else 0.3,  # a neighbour's job starts
    "steady": lambda now: 0.25,
    # 8x faster from 45% on: the steps sized at the 50% mark run out before the 75% mark.
    "much-faster-midway": lambda now: 0.4 if now < 0.45 * BUDGET_S else 0.05,
}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("budget"), n_docs=60)


@pytest.mark.parametrize("profile", list(PROFILES))
def test_budget_is_used_and_lr_is_continuous(shards, tmp_path, monkeypatch, profile):
    clock = FakeClock(PROFILES[profile])
    original = Trainer._attempt_step

    def timed_step(self, step):
        clock.now += clock.seconds_per_step(clock.now)
        return original(self, step)

    monkeypatch.setattr(Trainer, "_attempt_step", timed_step)
    cfg = tiny_config(f"train.time_budget={BUDGET_S:.0f}s", "train.max_steps=100000", "train.log_every=1",
                      "train.warmup_steps=20", "train.eval_every=100000", "train.checkpoint_every=100000")
    result = pretrain(cfg, shards, tmp_path / "run", clock=clock)

    records = read_metrics(tmp_path / "run")
    sizes = [r["max_steps"] for r in records if r.get("event") == "budget"]
    assert len(set(sizes)) >= 2, "the budget was re-estimated (else this test proves nothing)"
    assert clock.now <= BUDGET_S
    assert clock.now >= 0.9 * BUDGET_S, f"only {clock.now:.0f}s of {BUDGET_S:.0f}s used"

    lines = [r for r in records if "lr" in r]
    assert [r["step"] for r in lines] == list(range(1, result.step + 1))
    peak, warmup = cfg.train.lr, cfg.train.warmup_steps  # warmup as the first sizing left it
    after_warmup = [r["lr"] / peak for r in lines if r["step"] > warmup]
    jumps = [abs(a - b) for a, b in zip(after_warmup, after_warmup[1:])]
    assert max(jumps) < 0.02, f"learning rate jumps by {max(jumps):.3f} of its peak"
    assert all(b <= a + 1e-12 for a, b in zip(after_warmup, after_warmup[1:])), "cosine only falls"
    if "budget_exhausted" not in {r.get("event") for r in records}:
        assert after_warmup[-1] == pytest.approx(cfg.train.min_lr_ratio, abs=1e-6)


def test_anchored_cosine_goes_on_from_where_it_was():
    cfg = TrainConfig(max_steps=200, warmup_steps=10, min_lr_ratio=0.1)
    at = 120
    before = lr_multiplier(at, cfg, 200)
    for new_total in (150, 400):
        anchor = (at, decay_progress(at, 10, 200))
        assert lr_multiplier(at, cfg, new_total, anchor) == pytest.approx(before)
        assert lr_multiplier(new_total, cfg, new_total, anchor) == pytest.approx(0.1)
        # Without the anchor the old behaviour: the same step jumps to another learning rate.
        assert abs(lr_multiplier(at + 1, cfg, new_total) - before) > 0.05


def test_reserve_shrinks_to_the_measured_cost_of_evaluation_and_checkpoint(shards, tmp_path, monkeypatch):
    """Once evaluations and checkpoints have been timed, the run keeps twice their cost free for the
    final ones instead of a fixed 5% of the budget: it ends within the budget, final evaluation and
    checkpoint included, having trained past the old 95% mark."""
    clock = FakeClock(lambda now: 0.25)
    step, evaluate, save = Trainer._attempt_step, Trainer.evaluate, Trainer._save_checkpoint

    def timed_step(self, n):
        clock.now += 0.25
        return step(self, n)

    def slow_evaluate(self):
        clock.now += 0.5  # an evaluation costs two steps' time
        return evaluate(self)

    def slow_save(self):
        clock.now += 0.25
        return save(self)

    monkeypatch.setattr(Trainer, "_attempt_step", timed_step)
    monkeypatch.setattr(Trainer, "evaluate", slow_evaluate)
    monkeypatch.setattr(Trainer, "_save_checkpoint", slow_save)
    cfg = tiny_config(f"train.time_budget={BUDGET_S:.0f}s", "train.max_steps=100000", "train.warmup_steps=20",
                      "train.eval_every=40", "train.checkpoint_every=40")
    pretrain(cfg, shards, tmp_path / "run", clock=clock)
    assert clock.now <= BUDGET_S  # the final evaluation and checkpoint fit
    # A fixed 5% reserve stops training at 95 s and ends by 96 s; 2 x (0.5 + 0.25) + 1 s leaves 2.5 s.
    assert clock.now > 0.97 * BUDGET_S
