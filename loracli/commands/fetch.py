"""`lora fetch MODEL`: download a model into the cache through the chosen mirror, verified."""

from __future__ import annotations

from typing import List, Optional

import typer

from loracli import output
from loracli.options import MirrorOpt, ModelArg


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
                      f"{_size(e['todo_bytes'])}, from {e['mirror']}")
            if self.bars and e["todo_bytes"]:
                from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                           TimeRemainingColumn, TransferSpeedColumn)

                self.progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                         DownloadColumn(), TransferSpeedColumn(),
                                         TimeRemainingColumn(), console=output.console(),
                                         transient=True)
                self.progress.start()
                self.task = self.progress.add_task("fetch", total=e["todo_bytes"])
        elif kind == "progress" and self.progress is not None:
            self.progress.update(self.task, advance=e["bytes"])

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress.console.print(message, markup=False)
        else:
            output.note(message)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fetch(
    model: ModelArg,
    mirror: MirrorOpt = None,
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit sha."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Glob of files to take "
                                                "(repeatable; default: the diffusers folders, safetensors)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Glob of files to skip (repeatable)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Weights variant, e.g. fp16."),
    strict: bool = typer.Option(False, "--strict", help="Use only the chosen mirror: no fallback."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List files and sizes; download nothing."),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=32, help="Files downloaded in parallel."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds without data before a "
                                            "mirror counts as stalled (default 30, or LORA_TIMEOUT)."),
    json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Download a model into the cache: resumable, sha256-verified, with mirror fallback."""
    from loracli import hub

    reporter = Reporter()
    try:
        result = hub.fetch(model, mirror=mirror, revision=revision, include=include or (),
                           exclude=exclude or (), variant=variant, strict=strict, dry_run=dry_run,
                           workers=jobs, timeout=timeout, on_event=reporter)
    finally:
        reporter.close()
    output.emit(result, json, _render)


def _render(r: dict) -> None:
    if r.get("dry_run"):
        output.table([{**f, "size": _size(f["size"]), "cached": "yes" if f["cached"] else ""}
                      for f in r["files"]], ["path", "size", "cached"])
        output.note(f"{r['repo_id']}@{r['commit'][:7]} via {r['mirror']}: {len(r['files'])} files, "
                    f"{_size(r['size'])}; {_size(r['to_download'])} to download")
        return
    if r.get("mirror") == "local build" and not r.get("cached"):
        output.note(f"{r['model']}: built locally ({r['files']} files, {_size(r['size'])}), no network")
    elif r.get("cached"):
        output.note(f"{r['model']} already cached ({r['commit'][:7]}); nothing transferred")
    else:
        output.note(f"{r['model']}: {r['files']} files, {_size(r['size'])} at {r['commit'][:7]} "
                    f"({_size(r['downloaded'])} transferred via {r['mirror']}), verified")
    print(r["snapshot"])
