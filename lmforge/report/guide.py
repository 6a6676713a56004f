"""`lmforge guide --pdf OUT.pdf`: the chapters of docs/guide/ as one PDF, in the index's order.

The order is the one of the chapter links in docs/guide/README.md (its table), so the index and the
PDF never disagree. Each chapter's Markdown is read into the report's document model (headings,
paragraphs, lists, tables, code blocks, images) and drawn by the report's PDF renderer
(lmforge/report/render.py: matplotlib only, no LaTeX or browser), one chapter per section, each
starting on a new page. Inline Markdown (links, `code`, **bold**) is shown as its plain text.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from lmforge.errors import UserError
from lmforge.outputs import add_force_arg, check_output
from lmforge.report.document import Block, Code, Figure, Heading, Paragraph, Report, Section, Table

INDEX = "README.md"
_CHAPTER_LINK = re.compile(r"\]\(([\w.-]+\.md)\)")  # a chapter of the index: [title](name.md)
_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$")
_FENCE = re.compile(r"^(```|~~~)")


def default_guide_dir() -> Path:
    """docs/guide of the source tree this lmforge runs from."""
    return Path(__file__).resolve().parents[2] / "docs" / "guide"


def chapter_files(guide_dir: Path) -> list[Path]:
    """The chapters, in the order the index (README.md) links them, each once."""
    index = guide_dir / INDEX
    if not index.is_file():
        raise UserError(f"{index} not found: give --guide-dir, the docs/guide directory of a "
                        "source checkout of lmforge")
    names: list[str] = []
    for name in _CHAPTER_LINK.findall(index.read_text(encoding="utf-8")):
        if name != INDEX and name not in names:
            names.append(name)
    missing = [n for n in names if not (guide_dir / n).is_file()]
    if missing:
        raise UserError(f"{index} links {missing[0]}, which does not exist in {guide_dir}")
    if not names:
        raise UserError(f"{index} links no chapter (no [title](chapter.md) links)")
    return [guide_dir / n for n in names]


def plain(text: str) -> str:
    """Inline Markdown as plain text: [text](url) -> text, `code` -> code, **b** / *i* -> b / i."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = re.sub(r"`([^`]*)`", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    return re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)


def read_chapter(path: Path, guide_dir: Path) -> Section:
    """One chapter as a section: its `# title` and the blocks of its body."""
    lines = path.read_text(encoding="utf-8").splitlines()
    title = path.stem
    blocks: list[Block] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(Paragraph(plain(" ".join(s.strip() for s in paragraph))))
            paragraph.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence:
            flush()
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(fence.group(1))), len(lines))
            blocks.append(Code("\n".join(lines[i + 1:end])))
            i = end + 1
            continue
        heading = re.match(r"^(#{1,6})\s+(.*)$", line)
        image = _IMAGE.match(line.strip())
        if heading:
            flush()
            if len(heading.group(1)) == 1 and not blocks:
                title = plain(heading.group(2))
            else:
                blocks.append(Heading(plain(heading.group(2)), min(len(heading.group(1)) + 1, 4)))
        elif image:
            flush()
            if not (guide_dir / image.group(2)).is_file():
                raise UserError(f"{path}: image {image.group(2)} not found")
            blocks.append(Figure(image.group(2), plain(image.group(1))))
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [plain(c.strip()) for c in re.split(r"(?<!\\)\|", lines[i].strip())[1:-1]]
                if not all(re.fullmatch(r":?-+:?", c) for c in cells):  # not the |---| rule
                    rows.append([c.replace("\\|", "|") for c in cells])
                i += 1
            blocks.append(Table(rows[0], rows[1:]))
            continue
        elif re.match(r"^\s*([-*]|\d+\.)\s+", line):  # a list item starts a paragraph of its own
            flush()
            paragraph.append(re.sub(r"^\s*([-*])\s+", "\u2022 ", line))
        elif not line.strip():
            flush()
        else:
            paragraph.append(line)
        i += 1
    flush()
    return Section(title, blocks)


def build_guide_pdf(out: str | Path, guide_dir: str | Path | None = None) -> Path:
    """Write every chapter of the guide, in the index's order, into one PDF at `out`."""
    from lmforge.atomic import atomic_write_bytes
    from lmforge.report.render import write_pdf

    guide_dir = Path(guide_dir) if guide_dir else default_guide_dir()
    report = Report("The lmforge guide: from raw text to a chat assistant")
    report.sections = [read_chapter(path, guide_dir) for path in chapter_files(guide_dir)]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        write_pdf(report, guide_dir, tmp, section_pages=True, creator="lmforge guide")
        atomic_write_bytes(out, tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    return out


def guide_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pdf", required=True, metavar="OUT.pdf",
                        help="write every chapter of docs/guide/, in the index's order, into this PDF")
    parser.add_argument("--guide-dir", metavar="DIR",
                        help="the guide's directory (default: docs/guide of this source tree)")
    add_force_arg(parser)


def guide_command(args: argparse.Namespace) -> int:
    check_output(args.pdf, args.force, directory=False, flag="--pdf")
    out = build_guide_pdf(args.pdf, args.guide_dir)
    print(f"guide: {out}")
    return 0
