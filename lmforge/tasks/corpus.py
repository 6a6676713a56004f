"""Questions about the built-in corpus the base model read (`builtin:default`):

- shakespeare: who speaks a given line, and in which play;
- bible: which book of the Bible a verse is from;
- docstrings: what a standard-library function's docstring says it does.

The archives come from `lmforge.data.builtin` (fetched once, pinned, cached); the questions are
built once per process and archive set.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

from lmforge.data import builtin
from lmforge.tasks.common import Example, Task, conversation, normalize

MIN_WORDS = 6  # shorter lines ("My lord.") are not a fair question


class CorpusTask(Task):
    """A task over the built-in corpus; `cache`/`parts` default to the real, cached archives."""

    def __init__(self, cache: Path | None = None, parts: tuple = builtin.PARTS,
                 code_max_bytes: int = 4_000_000) -> None:
        self.cache, self.parts, self.code_max_bytes = cache, parts, code_max_bytes

    def archive(self, name: str) -> Path:
        part = next(p for p in self.parts if p.name == name)
        return builtin.fetch(part, self.cache)


# -- Shakespeare -------------------------------------------------------------------------------

_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\- ]{0,24}(?:\.[A-Za-z'\- ]{1,24})*)\.$")


SMALL_WORDS = {"of", "the", "and", "in", "for", "a"}


def play_title(name: str, text: str) -> str:
    """'HAMLET, PRINCE OF DENMARK' -> 'Hamlet'; 'THE TRAGEDY OF TITUS ANDRONICUS' -> 'Titus
    Andronicus': the first line up to a comma or semicolon, without "The Tragedy of", in title
    case (the file `name` where the first line is not a title)."""
    first = next(line for line in text.splitlines() if line.strip())
    if not first[:1].isalpha():
        first = name.removesuffix("_gut").replace("_", " ")
    first = re.split("[,;]", first)[0].strip()
    words = re.sub(r"(?i)^the (tragedy|life|history) of ", "", first).split()
    return " ".join(w.upper() if re.fullmatch(r"(?i)[ivx]+", w) and i else
                    w.lower() if i and w.lower() in SMALL_WORDS else w.capitalize()
                    for i, w in enumerate(words))


def expand_speaker(label: str, cast: str) -> str:
    """'Hor' -> 'Horatio' when the cast list names exactly one person starting so; else the label."""
    if " " in label or len(label) > 6:
        return label.title()
    names = {w.title() for w in re.findall(rf"\b{re.escape(label)}[A-Za-z]*", cast, re.IGNORECASE)}
    return names.pop() if len(names) == 1 else label.title()


def speeches(text: str) -> list[tuple[str, str]]:
    """(speaker, line) for every spoken line of a play in the Gutenberg layout: a speaker label
    line ending with '.', then the speech up to a blank line."""
    head, _, body = text.partition("\nACT ")
    if not body:  # not a play (the sonnets, the poems)
        return []
    out, speaker = [], None
    for raw in body.splitlines():
        line = raw.strip()
        if not line:
            speaker = None
        elif speaker is None:
            match = _SPEAKER.match(line)
            speaker = expand_speaker(match.group(1), head) if match else None
        elif not line.startswith("[") and len(line.split()) >= MIN_WORDS:
            out.append((speaker, line))
    return out


@functools.lru_cache(maxsize=4)
def _shakespeare_pool(archive: Path) -> tuple[Example, ...]:
    pool: dict[str, Example] = {}
    for name, text in builtin.read_shakespeare(archive):
        if name.endswith("_f"):
            continue  # the folio spelling of a play that is also there in modern spelling
        play = play_title(name, text)
        for speaker, line in speeches(text):
            question = f'Who says "{line}" in Shakespeare, and in which play?'
            answer = f"{speaker} says it, in {play}."
            pool.setdefault(line, Example("shakespeare", conversation(question, answer),
                                          f"{speaker}|{play}", line))
    return tuple(pool.values())


class Shakespeare(CorpusTask):
    name = "shakespeare"

    def pool(self) -> tuple[Example, ...]:
        return _shakespeare_pool(self.archive("shakespeare"))

    def check(self, example: Example, answer_text: str) -> bool:
        text = normalize(answer_text)
        return all(normalize(part) in text for part in example.answer.split("|"))


# -- Bible -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _bible_pool(archive: Path) -> tuple[Example, ...]:
    pool: dict[str, Example] = {}
    for book, chapter, verse, text in builtin.bible_verses(archive):
        text = " ".join(text.split())
        if len(text.split()) < MIN_WORDS:
            continue
        question = f'Which book of the Bible is this verse from? "{text}"'
        answer = f"It is from {book} (chapter {chapter}, verse {verse})."
        pool.setdefault(text, Example("bible", conversation(question, answer), book, text))
    return tuple(pool.values())


class Bible(CorpusTask):
    name = "bible"

    def pool(self) -> tuple[Example, ...]:
        return _bible_pool(self.archive("bible"))

    def check(self, example: Example, answer_text: str) -> bool:
        # The book's name as whole words: "John" must not be found inside "1 John".
        return re.search(rf"(?<!\d )\b{re.escape(example.answer)}\b", answer_text) is not None


# -- standard-library docstrings ----------------------------------------------------------------


def docstring_summary(doc: str) -> str:
    """The first paragraph of a docstring, on one line."""
    return " ".join(doc.strip().split("\n\n")[0].split())


@functools.lru_cache(maxsize=4)
def _docstring_pool(code_max_bytes: int) -> tuple[Example, ...]:
    pool: dict[str, Example] = {}
    for path, source in builtin.read_stdlib(code_max_bytes):
        module = path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            summary = docstring_summary(doc) if doc else ""
            if not MIN_WORDS <= len(summary.split()) <= 60:
                continue
            name = f"{module}.{node.name}"
            question = f"What does the Python standard-library function `{name}` do, according to its docstring?"
            answer = f"Its docstring says: {summary}"
            pool.setdefault(name, Example("docstrings", conversation(question, answer), summary, name))
    return tuple(pool.values())


class Docstrings(CorpusTask):
    name = "docstrings"

    def pool(self) -> tuple[Example, ...]:
        return _docstring_pool(self.code_max_bytes)

    def check(self, example: Example, answer_text: str) -> bool:
        return normalize(example.answer) in normalize(answer_text)
