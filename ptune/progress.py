"""Progress of a training run: a rich progress bar on a terminal, plain periodic lines in logs and files."""

from __future__ import annotations

import sys


class Reporter:
    """A rich progress bar on a terminal; periodic plain lines otherwise (CI logs, files)."""

    def __init__(self, total: int, enabled: bool):
        self.live = enabled and sys.stderr.isatty()
        self.progress = None
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total, info="")
            self.progress.start()

    def update(self, step: int, info: str, log: bool) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif log:
            print(f"step {step}: {info}", flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


class SilentReporter(Reporter):
    """Ranks other than 0 of a distributed run: rank 0 reports for all."""

    def __init__(self) -> None:
        self.live, self.progress = False, None

    def update(self, step: int, info: str, log: bool) -> None:
        pass

    def message(self, text: str) -> None:
        pass


