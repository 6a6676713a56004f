"""Render one `Report` as Markdown, HTML and PDF.

Markdown and HTML show the plots as relative links to the PNG files next to them. The PDF is drawn
with matplotlib's own PDF backend (no LaTeX, no browser, no system tools): text and tables are laid
out line by line on A4 pages and the PNGs are placed between them.
"""

from __future__ import annotations

import html
import textwrap
import warnings
from pathlib import Path

from lmforge.report.document import Block, Code, Figure, Heading, Paragraph, Report, Table

# --------------------------------------------------------------------------------------------
# Markdown


def to_markdown(report: Report) -> str:
    out = [f"# {report.title}", ""]
    out += [f"- [{s.title}](#{_anchor(s.title)})" for s in report.sections]
    out.append("")
    for section in report.sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            out += _markdown_block(block)
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def _markdown_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [block.text]
    if isinstance(block, Table):
        def row(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

        return [row(block.headers), "|" + "---|" * len(block.headers)] + [row(r) for r in block.rows]
    if isinstance(block, Code):
        fence = "~~~~" if "```" in block.text else "```"
        return [f"{fence}text", block.text.rstrip("\n"), fence]
    if isinstance(block, Figure):
        return [f"![{block.caption}]({block.path})", "", f"*{block.caption}*"]
    if isinstance(block, Heading):
        return [f"{'#' * block.level} {block.text}"]
    raise TypeError(f"unknown block {type(block).__name__}")


def _anchor(title: str) -> str:
    """The anchor GitHub (and our HTML) gives a heading."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.strip().replace(" ", "-")


# --------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { border-bottom: 1px solid #eee; margin-top: 2.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; vertical-align: top; }
th { background: #f5f5f5; }
pre { background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem;
      white-space: pre-wrap; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9rem; }
"""


def to_html(report: Report) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(report.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(report.title)}</h1>",
        "<nav><ul>",
        *(f'<li><a href="#{_anchor(s.title)}">{e(s.title)}</a></li>' for s in report.sections),
        "</ul></nav>",
    ]
    for section in report.sections:
        parts.append(f'<h2 id="{_anchor(section.title)}">{e(section.title)}</h2>')
        parts += [_html_block(b) for b in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_block(block: Block) -> str:
    e = html.escape
    if isinstance(block, Paragraph):
        return f"<p>{e(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{e(h)}</th>" for h in block.headers)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if isinstance(block, Code):
        return f"<pre>{e(block.text)}</pre>"
    if isinstance(block, Figure):
        return (f'<figure><img src="{e(block.path)}" alt="{e(block.caption)}">'
                f"<figcaption>{e(block.caption)}</figcaption></figure>")
    if isinstance(block, Heading):
        return f"<h{block.level}>{e(block.text)}</h{block.level}>"
    raise TypeError(f"unknown block {type(block).__name__}")


# --------------------------------------------------------------------------------------------
# PDF: a small flowing layout on A4 pages drawn by matplotlib.

_PAGE_W, _PAGE_H = 8.27, 11.69  # inches (A4)
_MARGIN = 0.7
_TEXT_CHARS = 105  # characters per line of 8.5 pt body text in the text width
_MONO_CHARS = 100  # characters per line of 7.5 pt monospace text


class _PdfWriter:
    """Places lines and images top to bottom, starting a new page when one is full."""

    def __init__(self, pdf) -> None:
        self.pdf = pdf
        self.fig = None
        self.y = 0.0  # inches from the top of the page

    def _new_page(self) -> None:
        import matplotlib.pyplot as plt

        self.close_page()
        self.fig = plt.figure(figsize=(_PAGE_W, _PAGE_H))
        self.y = _MARGIN

    def close_page(self) -> None:
        import matplotlib.pyplot as plt

        if self.fig is not None:
            self.pdf.savefig(self.fig)
            plt.close(self.fig)
            self.fig = None

    def _room(self, height: float) -> None:
        if self.fig is None or self.y + height > _PAGE_H - _MARGIN:
            self._new_page()

    def line(self, text: str, size: float = 8.5, height: float = 0.16, **style) -> None:
        self._room(height)
        self.fig.text(_MARGIN / _PAGE_W, 1 - (self.y + height * 0.8) / _PAGE_H, text,
                      fontsize=size, parse_math=False, va="baseline", **style)
        self.y += height

    def space(self, height: float) -> None:
        self.y += height

    def page_break(self) -> None:
        self.close_page()

    def heading(self, text: str, size: float, keep: float = 0.9) -> None:
        self._room(keep)  # never leave a heading alone at the bottom of a page
        self.space(0.12)
        self.line(text, size=size, height=size / 50, weight="bold")
        self.space(0.06)

    @staticmethod
    def image_size(pixels) -> tuple[float, float]:
        """(width, height) in inches of an image drawn across the text width."""
        width = _PAGE_W - 2 * _MARGIN
        height = width * pixels.shape[0] / pixels.shape[1]
        most = 0.55 * (_PAGE_H - 2 * _MARGIN)  # a tall screenshot shrinks to fit a page with text
        return (width * most / height, most) if height > most else (width, height)

    def image(self, path: Path, caption: str) -> None:
        import matplotlib.image as mpimg

        pixels = mpimg.imread(path)
        width, height = self.image_size(pixels)
        self._room(height + 0.3)
        ax = self.fig.add_axes((_MARGIN / _PAGE_W, 1 - (self.y + height) / _PAGE_H,
                                width / _PAGE_W, height / _PAGE_H))
        ax.imshow(pixels)
        ax.axis("off")
        self.y += height + 0.05
        self.line(caption, size=8, color="#555555", style="italic")


def write_pdf(report: Report, report_dir: Path, path: Path, section_pages: bool = False,
              creator: str = "lmforge report") -> None:
    """Write `report` as a PDF to `path`; figure paths are relative to `report_dir`.
    `section_pages` starts each section on a new page (the chapters of the guide)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backends.backend_pdf import PdfPages

    with warnings.catch_warnings(), PdfPages(path) as pdf:
        # Sample generations can hold characters the bundled fonts lack; a box is fine there.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        info = pdf.infodict()
        info["Title"] = report.title
        info["Creator"] = creator
        out = _PdfWriter(pdf)
        out.heading(report.title, size=17)
        for section in report.sections:
            if section_pages:
                out.page_break()
            out.heading(section.title, size=13, keep=_first_block_height(section, report_dir))
            for block in section.blocks:
                _pdf_block(out, block, report_dir)
                out.space(0.08)
        out.close_page()


def _first_block_height(section, report_dir: Path) -> float:
    """Room a section's heading needs below it: a figure that opens the section goes with it."""
    import matplotlib.image as mpimg

    first = section.blocks[0] if section.blocks else None
    if isinstance(first, Figure):
        return _PdfWriter.image_size(mpimg.imread(report_dir / first.path))[1] + 0.7
    return 0.9


def _pdf_block(out: _PdfWriter, block: Block, report_dir: Path) -> None:
    if isinstance(block, Paragraph):
        for line in textwrap.wrap(block.text, _TEXT_CHARS) or [""]:
            out.line(line)
    elif isinstance(block, Table):
        for line in _table_lines(block):
            out.line(line, size=7.5, height=0.14, family="monospace")
    elif isinstance(block, Code):
        for raw in block.text.rstrip("\n").split("\n"):
            for line in textwrap.wrap(raw, _MONO_CHARS, replace_whitespace=False,
                                      drop_whitespace=False) or [""]:
                out.line(line, size=7.5, height=0.14, family="monospace")
    elif isinstance(block, Figure):
        out.image(report_dir / block.path, block.caption)
    elif isinstance(block, Heading):
        out.heading(block.text, size=max(13 - 1.5 * (block.level - 2), 9.5))
    else:
        raise TypeError(f"unknown block {type(block).__name__}")


def _table_lines(table: Table) -> list[str]:
    """A table as aligned monospace lines; the widest columns are narrowed until a row fits the
    page, and a cell longer than its column wraps onto the next lines (nothing is cut)."""
    rows = [[c.replace("\n", " ") for c in r] for r in [table.headers, *table.rows]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.headers))]
    while sum(widths) + 2 * (len(widths) - 1) > _MONO_CHARS and max(widths) > 8:
        widths[widths.index(max(widths))] -= 1
    lines = []
    for row in rows:
        cells = [textwrap.wrap(c, w, break_long_words=True) or [""] for c, w in zip(row, widths)]
        for k in range(max(len(c) for c in cells)):
            lines.append("  ".join((c[k] if k < len(c) else "").ljust(w)
                                   for c, w in zip(cells, widths)).rstrip())
        if row is rows[0]:
            lines.append("  ".join("-" * w for w in widths))
    return lines
