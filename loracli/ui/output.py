"""stdout is for results (tables, paths, `--json`); stderr for progress, notes and errors.

Rich is imported only when something is printed, and colour follows `NO_COLOR` and the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable


def console(stderr: bool = True):
    from rich.console import Console

    return Console(stderr=stderr, no_color=bool(os.environ.get("NO_COLOR")), highlight=False,
                   soft_wrap=True)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and os.environ.get("TERM") != "dumb"


def note(message: str) -> None:
    """A line for the person watching: stderr, never stdout."""
    print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    note(f"warning: {message}")


def emit(result: Any, as_json: bool, render: Callable[[Any], None] | None = None) -> None:
    """Print a command's result: one JSON document on stdout, or the human rendering."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str, ensure_ascii=False) + "\n")
        sys.stdout.flush()
    elif render is not None:
        render(result)
    elif isinstance(result, str):
        print(result)
    else:
        sys.stdout.write(json.dumps(result, indent=2, default=str, ensure_ascii=False) + "\n")


def table(rows: list[dict], columns: list[str], title: str | None = None) -> None:
    """A plain table on stdout (rich on a terminal, tab-separated when piped)."""
    if not is_terminal(sys.stdout):
        print("\t".join(columns))
        for row in rows:
            print("\t".join(str(row.get(c, "")) for c in columns))
        return
    from rich.table import Table

    t = Table(title=title, show_edge=False, header_style="bold")
    for c in columns:
        t.add_column(c)
    for row in rows:
        t.add_row(*(str(row.get(c, "")) for c in columns))
    console(stderr=False).print(t)


class Progress:
    """A progress bar on stderr when it is a terminal, nothing otherwise: the one place bars are
    drawn (training has its own live view, `loracli.ui.trainview`).

        with output.Progress("captioning") as bar:
            bar.update(done, total)          # or bar.advance(n); bar.say(message) above it

    `unit="bytes"` shows sizes and transfer speed instead of a count.
    """

    def __init__(self, label: str, enabled: bool | None = None, unit: str = "items",
                 total: float | None = None):
        self.label, self.unit, self.total = label, unit, total
        self.enabled = is_terminal() if enabled is None else enabled
        self.bar = None
        self.task = None

    def __enter__(self) -> "Progress":
        if not self.enabled:
            return self
        from rich import progress as p

        columns = [p.TextColumn("{task.description}"), p.BarColumn()]
        columns += ([p.DownloadColumn(), p.TransferSpeedColumn()] if self.unit == "bytes"
                    else [p.MofNCompleteColumn()])
        self.bar = p.Progress(*columns, p.TimeRemainingColumn(), console=console(stderr=True),
                              transient=True)
        self.bar.start()
        self.task = self.bar.add_task(self.label, total=self.total)
        return self

    def update(self, done: float, total: float | None = None) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, total=total)

    def advance(self, amount: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=amount)

    def say(self, message: str) -> None:
        if self.bar is not None:
            self.bar.console.print(message, markup=False, highlight=False)
        else:
            note(message)

    def __exit__(self, *exc) -> bool:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        return False

