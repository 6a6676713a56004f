"""`lmforge report RUN_DIR`: regenerate a run's report from its artefacts."""

from __future__ import annotations

import argparse


def report_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a directory written by `lmforge run` "
                        "or `lmforge pretrain`; RUN_DIR/report/ gets report.md, .html, .pdf and "
                        "plots/ (other files there are left alone)")


def report_command(args: argparse.Namespace) -> int:
    from lmforge.report import build_report

    out = build_report(args.run_dir)
    print(f"report: {out / 'report.html'}")
    print(f"        {out / 'report.md'}")
    print(f"        {out / 'report.pdf'}")
    return 0
