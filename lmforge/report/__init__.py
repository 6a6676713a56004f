"""The run report: `report/report.md`, `report.html` and `report.pdf` from a run directory.

`build_report(run_dir)` reads only artefacts on disk (config, data manifest, tokenizer stats,
metrics.jsonl, checkpoints, samples, stage records), so `lmforge report RUN_DIR` can regenerate it
at any time, also for a run that is still going or one that was interrupted.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.atomic import atomic_directory
from lmforge.errors import UserError
from lmforge.pipeline.layout import RunLayout

__all__ = ["build_report"]


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/ (replacing the old one in one rename); return its path."""
    from lmforge.report.collect import collect
    from lmforge.report.render import to_html, to_markdown, write_pdf

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    final = RunLayout(run_dir).report
    with atomic_directory(final, overwrite=True) as tmp:
        tmp.chmod(0o755)  # a temporary directory starts private; the report is for reading
        plots_dir = tmp / "plots"
        plots_dir.mkdir()
        report = collect(run_dir, plots_dir)
        (tmp / "report.md").write_text(to_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(report), encoding="utf-8")
        write_pdf(report, tmp, tmp / "report.pdf")
    return final
