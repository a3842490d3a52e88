"""`ptune report DIR`: summarise a multirun folder (or any folder of runs) over seeds, or a `ptune search` folder."""

from __future__ import annotations

from pathlib import Path

from ..report import write_report


def report_main(argv: list[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="ptune report",
        description="Summarise a multirun folder (or any folder of runs) over seeds: table, CSV, Markdown, plot.",
    )
    parser.add_argument("dir", help="multirun folder, or any folder holding run folders with results.json")
    args = parser.parse_args(argv)
    from .search import is_search, report_search_main

    if is_search(Path(args.dir)):  # a `ptune search` folder: best trial, trials table, search.png
        report_search_main(Path(args.dir))
        return
    write_report(args.dir)
