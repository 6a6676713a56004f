"""What every stage of `lmforge run` is given (`Context`) and what it declares (`Stage`), and how the
time budget is split among the stages (`Context.stage_budget_s`).

The budget covers the whole invocation. The data stages take what they take. The stages that are
not trained (evaluation, samples, chat transcripts, export, report) are given no budget: the driver
keeps their cost free, as last measured in RUN/stages.json or, before it was ever measured, the
estimate in `FIXED_COST_S`. What is left is split among the training stages still to run
(pre-training, SFT, alignment) in proportion to their `run.*_share`, each at least `run.min_stage_s`.
A training stage sizes its steps to its seconds from the throughput it measures (train.time_budget),
so a stage that ends early leaves its time to the stages after it in the same invocation.

A stage's seconds do not depend on what an earlier invocation already finished: a stage that this
invocation skips (finished before, unchanged) is charged what the run gives it - a training stage
its nominal share of the budget, any other stage its measured seconds - so that alignment redone
alone after a change gets its share, not the whole budget that pre-training and SFT no longer need.
A stage continued after an interruption gets its share minus the seconds its earlier attempts spent
(RUN/stages.json keeps them as `spent_s`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.config import RunConfig
from lmforge.pipeline.layout import RunLayout

# The stages that train, in order; each one's seconds come from its share of the budget.
TRAINED = ("pretrain", "sft", "align")
# Seconds the driver keeps free for a stage that is not trained, until RUN/stages.json has a
# measured time of it. Measured with the tiny preset on 2 CPU cores (benchmarks/RESULTS.md,
# "Lifecycle"): evaluation of three models on chat + bpb + core at eval_limit=100 is the big one
# (and stops starting tasks when the budget is spent, posttrain.run_eval).
FIXED_COST_S = {"eval": 240.0, "sample": 10.0, "chat": 20.0, "export": 15.0, "report": 20.0}
# Kept free for the driver itself (imports, hashing outputs) when a budget is checked up front.
DRIVER_RESERVE_S = 5.0


@dataclass
class Context:
    cfg: RunConfig
    layout: RunLayout
    budget_s: float | None  # the whole invocation's wall-clock budget; None: no budget
    started: float  # time.monotonic() when the invocation started
    progress: bool
    same_inputs: bool = False  # the running stage's last attempt had the same inputs
    stamp: str = ""  # UTC time of this invocation, names the RUN/previous/ entries it makes
    old_config: str | None = None  # RUN/config.toml as this invocation found it
    left: list[str] = field(default_factory=list)  # planned stages not finished yet, running one first
    # Least seconds of each stage (a stage that ran in this invocation: what it took).
    estimates: dict[str, float] = field(default_factory=dict)
    selected: list[str] = field(default_factory=list)  # every stage of this invocation, in order
    planned: list[str] = field(default_factory=list)  # those it runs (the others are finished)
    spent: dict[str, float] = field(default_factory=dict)  # seconds earlier attempts of a continued stage took

    def remaining_s(self) -> float | None:
        if self.budget_s is None:
            return None
        return self.budget_s - (time.monotonic() - self.started)

    def trains(self, name: str) -> bool:
        """Does stage `name` train a model (and so take a share of the budget) in this config?"""
        return name in TRAINED and not (name == "align" and self.cfg.run.align == "none")

    def stage_budget_s(self, name: str) -> float | None:
        """Seconds training stage `name` may take now: its share of what is left after the
        untrained stages still to run and the stages this invocation skips, among the training
        stages still to run, less what its earlier attempts spent (None: no budget)."""
        remaining = self.remaining_s()
        if remaining is None:
            return None
        fixed = sum(self.estimates.get(n, 0.0) for n in self.left if not self.trains(n) and n != name)
        charged = sum(self.nominal_s(n) if self.trains(n) else self.estimates.get(n, 0.0)
                      for n in self.selected if n not in self.planned)
        charged += sum(seconds for n, seconds in self.spent.items() if n != name)
        shares = {n: self.cfg.run.share(n) for n in self.left if self.trains(n)}
        shares.setdefault(name, self.cfg.run.share(name))
        seconds = (remaining - fixed - charged) * shares[name] / sum(shares.values())
        return max(seconds - self.spent.get(name, 0.0), self.cfg.run.min_stage_s)

    def nominal_s(self, name: str) -> float:
        """Training stage `name`'s share of the budget less every untrained stage's seconds, as a
        run of all the selected stages in one invocation, each ending on time, would give it."""
        assert self.budget_s is not None
        untrained = sum(self.estimates.get(n, 0.0) for n in self.selected if not self.trains(n))
        shares = sum(self.cfg.run.share(n) for n in self.selected if self.trains(n))
        return (self.budget_s - untrained) * self.cfg.run.share(name) / shares


@dataclass(frozen=True)
class Stage:
    name: str
    after: tuple[str, ...]  # the stages whose outputs this one reads
    config: Callable[[Context], Any]  # the part of the config (and options) it depends on
    run: Callable[[Context], None]
    fingerprint: Callable[[Context], str | None]  # of its outputs; None when they are missing
    # What the stage writes (files or directories): kept aside when it is redone on other inputs.
    outputs: Callable[[RunLayout], list[Path]] = field(default=lambda layout: [])
