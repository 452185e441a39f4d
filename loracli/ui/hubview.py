"""How hub events and sizes look on a terminal: shared by `lora fetch`, `mirror sync`, `cache`.

`Reporter` turns the events `hub.fetch` and `sync.sync` emit (fallback, retry, note, plan,
progress) into lines on stderr, with a byte progress bar when stderr is a terminal.
"""

from __future__ import annotations

from loracli.ui import output


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class Reporter:
    """Renders hub events on stderr: switches and notes always, a byte progress bar on a terminal."""

    def __init__(self, bars: bool | None = None):
        self.bars = output.is_terminal() if bars is None else bars
        self.progress = None
        self.task = None

    def __call__(self, e: dict) -> None:
        kind = e.get("event")
        if kind == "fallback":
            then = f"; trying {e['next']}" if e.get("next") else ""
            where = f" ({e['path']})" if e.get("path") else ""
            self._say(f"{e['mirror']}: {e['reason']}{where}{then}")
        elif kind == "retry":
            self._say(f"{e['mirror']}: {e['reason']} ({e['path']}); retry {e['attempt']}")
        elif kind == "note":
            self._say(e["message"])
        elif kind == "plan":
            if e["todo"] == 0:
                return
            self._say(f"downloading {e['todo']} of {e['files']} files, "
                      f"{human_size(e['todo_bytes'])}, from {e['mirror']}")
            if self.bars and e["todo_bytes"]:
                self._start(e["todo_bytes"])
        elif kind == "progress" and self.progress is not None:
            self.progress.update(self.task, advance=e["bytes"])

    def _start(self, total: int) -> None:
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn, TransferSpeedColumn)

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(),
                                 console=output.console(), transient=True)
        self.progress.start()
        self.task = self.progress.add_task("fetch", total=total)

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, markup=False)
        else:
            output.note(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
