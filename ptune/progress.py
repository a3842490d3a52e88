"""Progress of a training run: a rich progress bar on a terminal, a tqdm bar in a Jupyter notebook, plain periodic
lines in logs and files."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Sequence


def in_notebook() -> bool:
    """Running in a Jupyter (IPython) kernel: its stderr is no terminal, but it redraws a bar in the cell's output."""
    ipython = sys.modules.get("IPython")  # never imported here: a kernel has always imported it already
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return getattr(shell, "kernel", None) is not None


class Reporter:
    """A rich progress bar on a terminal; a tqdm.auto bar in a notebook (a widget where ipywidgets is installed,
    text redrawn in place otherwise); periodic plain lines otherwise (CI logs, files)."""

    def __init__(self, total: int, enabled: bool):
        self.live = enabled and sys.stderr.isatty()
        self.progress = None
        self.bar = None
        if enabled and not self.live and in_notebook():
            with warnings.catch_warnings():  # tqdm.auto warns when it falls back to text (no ipywidgets)
                warnings.simplefilter("ignore")
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc="train", unit="step", dynamic_ncols=True)
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
        elif self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(info, refresh=False)
        elif log:
            print(f"step {step}: {info}", flush=True)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.console.print(text)
        elif self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.bar is not None:
            self.bar.close()


class SilentReporter(Reporter):
    """Ranks other than 0 of a distributed run: rank 0 reports for all."""

    def __init__(self) -> None:
        self.live, self.progress, self.bar = False, None, None

    def update(self, step: int, info: str, log: bool) -> None:
        pass

    def message(self, text: str) -> None:
        pass


def print_table(title: str, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[str]]):
    """Print a table of text cells on ``table_console``: the one place ptune's commands (eval, report, search) draw
    a table. A column is a name, or (name, justify). Returns the console, for lines that follow the table."""
    from rich.table import Table

    table = Table(title=title)
    for col in columns:
        name, justify = (col, "left") if isinstance(col, str) else col
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*row)
    console = table_console()
    console.print(table)
    return console


def table_console():
    """A rich console for tables: a terminal's own width, but 200 columns for logs and pipes, where rich would
    otherwise squeeze every table into 80 columns and cut its cells to "0.87…"."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)
