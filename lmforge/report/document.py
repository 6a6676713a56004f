"""A report as plain data: sections of paragraphs, tables, code blocks and figures.

The collectors build one `Report`; the renderers turn the same object into Markdown, HTML and PDF,
so the three formats can never disagree about what the run did.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Code:
    text: str


@dataclass
class Figure:
    path: str  # relative to the report directory, e.g. "plots/loss.png"
    caption: str


@dataclass
class Heading:
    """A heading inside a section (level 3 and below: the section itself is level 2)."""

    text: str
    level: int = 3


Block = Paragraph | Table | Code | Figure | Heading


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Report:
    title: str
    sections: list[Section] = field(default_factory=list)


def not_available(title: str, why: str) -> Section:
    """The section a missing or unreadable artefact becomes instead of a crash."""
    return Section(title, [Paragraph(f"Not available: {why}.")])
