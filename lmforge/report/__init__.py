"""The run report: `report/report.md`, `report.html` and `report.pdf` from a run directory.

`build_report(run_dir)` reads only artefacts on disk (config, data manifest, tokenizer stats,
metrics.jsonl, checkpoints, samples, stage records), so `lmforge report RUN_DIR` can regenerate it
at any time, also for a run that is still going or one that was interrupted.

RUN/report/ may hold the user's own files too: a build replaces only the files it generates (each
in one rename) and removes only files an earlier build generated, listed in report/.generated.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from lmforge.atomic import atomic_write_text, fsync_dir
from lmforge.errors import UserError
from lmforge.pipeline.layout import RunLayout
from lmforge.runlock import run_lock

__all__ = ["build_report", "check_run_dir"]

GENERATED = ".generated"  # in RUN/report: the files the last build wrote, one relative path a line


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path when it is a run directory (of `lmforge run` or `lmforge pretrain`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    layout = RunLayout(run_dir)
    if not any(p.exists() for p in (layout.stages, layout.config, layout.metrics, layout.checkpoints)):
        raise UserError(f"{run_dir} is not a run directory (no stages.json, config.toml, "
                        "metrics.jsonl or checkpoints/): give one written by `lmforge run` or "
                        "`lmforge pretrain`")
    return run_dir


def build_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/ (replacing the files an earlier build wrote); return its path."""
    from lmforge.report.collect import collect
    from lmforge.report.render import to_html, to_markdown, write_pdf

    run_dir = check_run_dir(run_dir)
    final = RunLayout(run_dir).report
    # The report has its own lock, not the run's: a report of a run still training is allowed.
    with run_lock(final, "report"), tempfile.TemporaryDirectory(prefix=".report.", dir=run_dir) as t:
        tmp = Path(t)
        plots_dir = tmp / "plots"
        plots_dir.mkdir()
        report = collect(run_dir, plots_dir)
        (tmp / "report.md").write_text(to_markdown(report), encoding="utf-8")
        (tmp / "report.html").write_text(to_html(report), encoding="utf-8")
        write_pdf(report, tmp, tmp / "report.pdf")
        _install(tmp, final)
    return final


def _install(built: Path, final: Path) -> None:
    """Move the files of `built` into `final` one rename each; drop stale ones of a former build."""
    names = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    for name in names:
        target = final / name
        if target.is_dir():
            raise UserError(f"{target} is a directory; the report writes a file there")
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(built / name, "rb") as f:
            os.fsync(f.fileno())
        os.replace(built / name, target)
    listing = final / GENERATED
    former = listing.read_text(encoding="utf-8").splitlines() if listing.is_file() else []
    for name in set(former) - set(names):
        if name and ".." not in Path(name).parts:  # only paths inside the report
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                (final / name).unlink()
    atomic_write_text(listing, "".join(f"{name}\n" for name in names))
    fsync_dir(final)
