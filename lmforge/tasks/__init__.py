"""Verifiable task generators: `builtin:chat` for SFT, and the same questions for evaluation,
DPO pair building and RL rewards.

    from lmforge.tasks import make_tasks, builtin_chat
    examples = builtin_chat("train", seed=0, n=20_000)          # a deterministic mixture
    task = make_tasks()["arithmetic"]; ex = task.generate("test", seed=0, n=1)[0]
    task.check(ex, "... #### 42")                                 # True when the answer is right

Each task lives in its own module with the `Task` shape of `lmforge.tasks.common`: `generate(split,
seed, n)` and `check(example, answer_text)`. The train and test splits never share a question.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.tasks.arithmetic import Arithmetic, ShortArithmetic
from lmforge.tasks.chitchat import CHATTERBOT, ChitChat
from lmforge.tasks.common import SPLITS, Example, Task, check_split
from lmforge.tasks.corpus import Bible, Docstrings, Shakespeare
from lmforge.tasks.identity import Identity
from lmforge.tasks.letters import Letters

BUILTIN_CHAT = "builtin:chat"
BUILTIN_ARITHMETIC = "builtin:arithmetic"  # short symbolic arithmetic: a curriculum's first stage

# Share of each task in `builtin:chat` (identity is a small pool, repeated to fill its share).
MIXTURE = {
    "arithmetic": 0.45, "shakespeare": 0.08, "bible": 0.08, "docstrings": 0.07,
    "letters": 0.15, "identity": 0.02, "chitchat": 0.15,
}


def make_tasks(cache: Path | None = None, code_max_bytes: int = 4_000_000) -> dict[str, Task]:
    """Every built-in task by name; `cache` is where corpus archives are (default: the cache)."""
    tasks: list[Task] = [
        Arithmetic(), Shakespeare(cache, code_max_bytes=code_max_bytes),
        Bible(cache, code_max_bytes=code_max_bytes), Docstrings(cache, code_max_bytes=code_max_bytes),
        Letters(), Identity(), ChitChat(cache),
    ]
    return {t.name: t for t in tasks}


def builtin_chat(split: str, seed: int, n: int, tasks: dict[str, Task] | None = None,
                 mixture: dict[str, float] | None = None) -> list[Example]:
    """About `n` examples of the `builtin:chat` mixture, task by task in MIXTURE's shares."""
    check_split(split)
    tasks = tasks if tasks is not None else make_tasks()
    mixture = mixture or MIXTURE
    out: list[Example] = []
    for name, share in mixture.items():
        out += tasks[name].generate(split, seed, max(1, round(share * n)))
    return out


def builtin_arithmetic(split: str, seed: int, n: int) -> list[Example]:
    """`n` examples of `builtin:arithmetic` (`ShortArithmetic`): fine-tune on it first, then on
    `builtin:chat`, for a small model to learn the calculator calls (docs/guide/finetuning.md)."""
    return ShortArithmetic().generate(split, seed, n)


__all__ = ["BUILTIN_ARITHMETIC", "BUILTIN_CHAT", "CHATTERBOT", "MIXTURE", "SPLITS", "Example", "Task", "builtin_arithmetic", "builtin_chat",
           "make_tasks"]
