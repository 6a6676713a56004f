"""`lmforge guide --pdf`: the guide's chapters in the index's order, one section (page) each, with
their images embedded; the Markdown they are written in read into headings, tables, code, lists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.errors import UserError
from lmforge.report.document import Code, Figure, Heading, Paragraph, Table
from lmforge.report.guide import (
    build_guide_pdf,
    chapter_files,
    default_guide_dir,
    plain,
    read_chapter,
)

GUIDE = default_guide_dir()


def pdf_pages(path: Path) -> tuple[list[str], list[int]]:
    """Each page's text and its number of embedded images."""
    import pypdfium2 as pdfium
    import pypdfium2.raw as pdfium_c

    pdf = pdfium.PdfDocument(str(path))
    texts = [pdf[i].get_textpage().get_text_range() for i in range(len(pdf))]
    images = [len(list(pdf[i].get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE]))) for i in range(len(pdf))]
    pdf.close()
    return texts, images


def small_guide(root: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    guide = root / "guide"
    guide.mkdir()
    (guide / "README.md").write_text(
        "# Index\n\n| chapter | stage |\n|---|---|\n| [Second](b.md) | two |\n| [First](a.md) | one |\n"
        "See also [the second again](b.md).\n")
    (guide / "a.md").write_text("# Alpha chapter\n\nText with `code` and a [link](x.md).\n\n"
                                "## Part\n\n- one\n- two\n\n![A red square](red.png)\n")
    (guide / "b.md").write_text("# Beta chapter\n\n```bash\nlmforge run --preset tiny\n```\n\n"
                                "| a | b |\n|---|---|\n| 1 | x \\| y |\n")
    fig, ax = plt.subplots(figsize=(3, 2))
    ax.add_patch(plt.Rectangle((0, 0), 1, 1, color="red"))
    fig.savefig(guide / "red.png")
    plt.close(fig)
    return guide


def test_chapters_follow_the_index_and_are_read_into_blocks(tmp_path):
    guide = small_guide(tmp_path)
    assert [p.name for p in chapter_files(guide)] == ["b.md", "a.md"]
    alpha = read_chapter(guide / "a.md", guide)
    assert alpha.title == "Alpha chapter"
    assert alpha.blocks[0] == Paragraph("Text with code and a link.")
    assert alpha.blocks[1] == Heading("Part", 3)
    assert [b.text for b in alpha.blocks[2:4]] == ["\u2022 one", "\u2022 two"]
    assert alpha.blocks[4] == Figure("red.png", "A red square")
    beta = read_chapter(guide / "b.md", guide)
    assert beta.blocks == [Code("lmforge run --preset tiny"), Table(["a", "b"], [["1", "x | y"]])]
    assert plain("**bold** and *it* and 2 * 3 * 4") == "bold and it and 2 * 3 * 4"


def test_small_guide_pdf_has_a_page_per_chapter_and_the_image(tmp_path):
    guide = small_guide(tmp_path)
    out = build_guide_pdf(tmp_path / "guide.pdf", guide)
    texts, images = pdf_pages(out)
    assert len(texts) == 3  # the title page, then one page per chapter
    assert texts[1].lstrip().startswith("Beta chapter") and texts[2].lstrip().startswith("Alpha chapter")
    assert images == [0, 0, 1]


def test_broken_index_and_cli_errors(tmp_path):
    guide = small_guide(tmp_path)
    (guide / "a.md").unlink()
    with pytest.raises(UserError, match="links a.md, which does not exist"):
        chapter_files(guide)
    done = subprocess.run([sys.executable, "-m", "lmforge", "guide", "--pdf", str(tmp_path / "g.pdf"),
                           "--guide-dir", str(guide)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    (tmp_path / "exists.pdf").write_text("mine")
    done = subprocess.run([sys.executable, "-m", "lmforge", "guide", "--pdf", str(tmp_path / "exists.pdf")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--force" in done.stderr
    assert (tmp_path / "exists.pdf").read_text() == "mine"


@pytest.mark.slow
def test_the_real_guide_builds_with_every_chapter_and_image(tmp_path):
    chapters = chapter_files(GUIDE)
    done = subprocess.run([sys.executable, "-m", "lmforge", "guide", "--pdf", str(tmp_path / "guide.pdf")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    texts, images = pdf_pages(tmp_path / "guide.pdf")
    # Each chapter starts a page with its title, in the index's order.
    titles = [re.match(r"# (.+)", p.read_text(encoding="utf-8")).group(1) for p in chapters]
    page = 1  # after the title page
    for title in titles:
        page = next(i for i in range(page, len(texts)) if texts[i].lstrip().startswith(plain(title))) + 1
    # Every image the chapters show is in the PDF.
    shown = sum(len(re.findall(r"^!\[", p.read_text(encoding="utf-8"), flags=re.M)) for p in chapters)
    assert shown >= 3 and sum(images) == shown
