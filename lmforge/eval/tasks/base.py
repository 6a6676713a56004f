"""The one item shape every log-likelihood task reads into, and how prompts are put together.

Prompts follow lm-evaluation-harness (its task YAMLs in `lm_eval/tasks/`): a request scores the
continuation `target_delimiter + choice` after `description + shots + doc_to_text`, shots being
`doc_to_text + target_delimiter + gold choice`, joined by the few-shot delimiter "\\n\\n".
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
FEWSHOT_SEED = 1234  # lm-evaluation-harness' default fewshot_seed


@dataclass(frozen=True)
class Item:
    """One question: its prompt (`doc_to_text`), the choices (`doc_to_choice`) and the gold index.

    `target` is set for partial scoring (WinoGrande): every choice is then a *context* (the
    sentence up to the blank, filled in) and the shared `target` (the rest of the sentence) is
    the continuation scored after each. A log-likelihood task (LAMBADA) has one choice, gold 0.
    """

    context: str
    choices: tuple[str, ...]
    gold: int
    target: str | None = None
    description: str = ""  # put before the shots (MMLU's "The following are ... about X.")
    pool: str = ""  # which few-shot pool this item draws from (MMLU: its subject)

    def requests(self, prefix: str = "") -> list[tuple[str, str]]:
        """(context, continuation) per choice, with `prefix` (description and shots) in front."""
        if self.target is not None:
            return [(prefix + choice, TARGET_DELIMITER + self.target) for choice in self.choices]
        return [(prefix + self.context, TARGET_DELIMITER + choice) for choice in self.choices]

    def demonstration(self) -> str:
        """This item answered correctly, as a few-shot example."""
        context, continuation = self.requests()[self.gold]
        return context + continuation


@dataclass(frozen=True)
class Benchmark:
    """A task: how to read its items and its few-shot pools, and how it is scored."""

    name: str
    load: Callable[[Path | None], tuple[list[Item], dict[str, list[Item]]]]  # items, shot pools
    chance: float  # accuracy of guessing, for the centred CORE-style aggregate
    acc_norm: bool = True  # whether lm-evaluation-harness reports acc_norm for it
    multiple_choice: bool = True  # False: one continuation, acc = greedy match (LAMBADA)
    first_n_shots: bool = False  # the first k of the pool (MMLU's dev split) instead of a sample
    shots_from_eval: bool = False  # pool is the evaluated split itself: never show the item
    tags: tuple[str, ...] = field(default=())


def shot_items(bench: Benchmark, items: Sequence[Item], pools: dict[str, list[Item]],
               shots: int) -> list[list[Item]]:
    """The few-shot examples of every item, sampled with a fixed seed per item."""
    chosen_all = []
    for index, item in enumerate(items):
        chosen: list[Item] = []
        if shots:
            pool = pools.get(item.pool, [])
            if bench.first_n_shots:
                chosen = pool[:shots]
            else:
                # Seeded per item, so --limit and the item order do not change an item's shots.
                rng = random.Random(FEWSHOT_SEED + index)
                picked = rng.sample(pool, min(len(pool), shots + bench.shots_from_eval))
                chosen = [s for s in picked if s is not item][:shots]
        chosen_all.append(chosen)
    return chosen_all


def with_shots(bench: Benchmark, items: Sequence[Item], pools: dict[str, list[Item]],
               shots: int) -> list[str]:
    """The prefix (description + shots) of every item."""
    return [item.description + "".join(s.demonstration() + FEWSHOT_DELIMITER for s in chosen)
            for item, chosen in zip(items, shot_items(bench, items, pools, shots), strict=True)]
