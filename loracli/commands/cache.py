"""`lora cache …`: what is in the model cache, is it intact, and removing a model."""

from __future__ import annotations

from typing import Optional

import typer

from loracli import output
from loracli.options import CachedModelArg

app = typer.Typer(help="The model cache: list, verify (re-hash), rm.", no_args_is_help=True)
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


@app.command("list")
def list_(json: bool = JsonOpt) -> None:
    """Models in the cache: size, commit, last sync."""
    from loracli import models
    from loracli.commands.fetch import _size

    rows = models.cached()
    if not rows and not json:
        output.note("the model cache is empty; try `lora fetch sd15`")
    output.emit(rows, json, lambda rs: output.table(
        [{**r, "commit": r["commit"][:7], "size": _size(r["size"])} for r in rs],
        ["model", "commit", "size", "files", "last_sync"]))


@app.command()
def verify(
    model: Optional[str] = typer.Argument(None, help="One model (default: every cached model)."),
    json: bool = JsonOpt,
) -> None:
    """Re-hash cached files; corrupt ones are deleted so `lora fetch` gets them again (exit 1)."""
    from loracli import models

    reports = models.verify(model)
    output.emit(reports, json, _render)
    if not all(r["ok"] for r in reports):
        bad = [r["model"] for r in reports if not r["ok"]]
        output.note(f"hint: lora fetch {bad[0]}")
        raise typer.Exit(1)


def _render(reports: list[dict]) -> None:
    for r in reports:
        state = "ok" if r["ok"] else f"{len(r['bad'])} bad"
        print(f"{r['model']}\t{r['commit'][:7]}\t{r['files']} files\t{state}")
        for b in r["bad"]:
            print(f"  {b['path']}: {b['problem']} (deleted)")


@app.command()
def rm(model: CachedModelArg, json: bool = JsonOpt) -> None:
    """Remove a model from the cache (every revision) and stop tracking it."""
    from loracli import models
    from loracli.commands.fetch import _size

    result = models.remove(model)
    output.note(f"removed {result['repo_id']} ({_size(result['freed'])} freed)")
    output.emit(result, json, lambda r: None)
