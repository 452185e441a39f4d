"""`lora cache …`: what is in the model cache, is it intact, and removing a model."""

from __future__ import annotations

import sys
from typing import Optional

import typer

from loracli.ui import output
from loracli.ui.hubview import human_size
from loracli.ui.options import CachedModelArg


def _model_names(incomplete: str) -> list[str]:
    from loracli.hub import models

    return models.complete_name(incomplete)


app = typer.Typer(help="The model cache: list, verify (re-hash), rm.", no_args_is_help=True)
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")
ModelArg = typer.Argument(..., help="Alias or org/name.", autocompletion=_model_names)


@app.command("list")
def list_(json: bool = JsonOpt) -> None:
    """Models in the cache: size, commit, last sync, and missing files (damaged)."""
    from loracli.hub import modelcache

    rows = modelcache.cached()
    if not rows and not json:
        output.note("the model cache is empty; try `lora fetch sd15`")
    output.emit(rows, json, lambda rs: output.table(
        [{**r, "commit": r["commit"][:7], "size": human_size(r["size"]),
          "missing": r["missing"] or ""} for r in rs],
        ["model", "commit", "size", "files", "missing", "last_sync"]))


@app.command()
def verify(
    model: Optional[str] = typer.Argument(None, help="One model (default: every cached model).",
                                          autocompletion=_model_names),
    json: bool = JsonOpt,
) -> None:
    """Re-hash cached files; corrupt ones are deleted so `lora fetch` gets them again. A damaged
    model is reported (exit 1) until it is fetched again."""
    from loracli.hub import modelcache

    reports = modelcache.verify(model)
    if not json:
        _render(reports)
    problem = modelcache.damage(reports)
    if problem:
        raise problem
    output.emit(reports, json, lambda r: None)


def _render(reports: list[dict]) -> None:
    for r in reports:
        state = "ok" if r["ok"] else f"{len(r['bad'])} bad"
        print(f"{r['model']}\t{r['commit'][:7]}\t{r['files']} files\t{state}")
        for b in r["bad"]:
            print(f"  {b['path']}: {b['problem']}")


@app.command()
def rm(
    model: CachedModelArg,
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed; remove nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask (for scripts)."),
    json: bool = JsonOpt,
) -> None:
    """Remove a model from the cache (every revision) and stop tracking it. Asks first on a
    terminal; scripts pass --yes."""
    from loracli.errors import LoraError
    from loracli.hub import modelcache

    plan = modelcache.remove(model, dry_run=True)
    what = f"{plan['repo_id']} ({len(plan['revisions'])} revision(s), {human_size(plan['freed'])})"
    if dry_run:
        output.note(f"would remove {what}: {plan['path']}")
        return output.emit(plan, json, lambda r: None)
    if not yes:
        if not _interactive():
            raise LoraError(f"not removing {what} without confirmation",
                            f"lora cache rm {model} --yes")
        if not typer.confirm(f"remove {what}?", default=False, err=True):
            raise LoraError(f"{plan['repo_id']} kept", f"lora cache rm {model} --yes")
    result = modelcache.remove(model)
    output.note(f"removed {result['repo_id']} ({human_size(result['freed'])} freed)")
    output.emit(result, json, lambda r: None)


def _interactive() -> bool:
    return sys.stdin.isatty() and output.is_terminal()
