"""`lora mirror …`: choose where models come from, test mirrors, and sync the cache from cron."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from loracli.ui import output
from loracli.ui.options import MirrorOpt

app = typer.Typer(help="Mirrors: list, add, remove, use, test; sync tracked models (cron) and status.",
                  no_args_is_help=True)
JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


def _complete(incomplete: str) -> list[str]:
    from loracli.hub import mirrors

    return [n for n in mirrors.names() if n.startswith(incomplete)]


NameArg = typer.Argument(..., help="Mirror name (or an http(s) URL).", autocompletion=_complete)


@app.command("list")
def list_(json: bool = JsonOpt) -> None:
    """List built-in and your mirrors, in the fallback order that `lora fetch` uses."""
    from loracli.hub import mirrors

    rows = mirrors.listing()
    output.emit(rows, json, _render_list)


def _render_list(rows: list[dict]) -> None:
    output.table(rows, ["name", "kind", "role", "url", "status"])
    output.note(f"order set by: {rows[0]['order_set_by'] if rows else 'nothing'}"
                "   (change it with `lora mirror use A B C`, or LORA_MIRROR=A,B,C)")


@app.command()
def add(
    name: str = typer.Argument(..., help="A short name, e.g. company."),
    url: str = typer.Argument(..., help="Base URL, e.g. https://hf.example.internal"),
    kind: str = typer.Option("hub", "--kind", help="hub (Hugging Face API) or files (plain files)."),
    force: bool = typer.Option(False, "--force", help="Replace a mirror of the same name."),
    json: bool = JsonOpt,
) -> None:
    """Add a mirror."""
    from loracli.hub import mirrors

    m = mirrors.add(name, url, kind, force=force)
    output.note(f"added {name}; try it first with `lora mirror use {name} hf-mirror hf`")
    output.emit(m.to_dict(), json, lambda r: None)


@app.command()
def remove(name: str = NameArg, json: bool = JsonOpt) -> None:
    """Remove one of your mirrors."""
    from loracli.hub import mirrors

    m = mirrors.remove(name)
    output.note(f"removed {name}")
    output.emit(m.to_dict(), json, lambda r: None)


@app.command()
def use(
    names: List[str] = typer.Argument(..., help="Mirror names (or URLs) in the order to try them.",
                                      autocompletion=_complete),
    json: bool = JsonOpt,
) -> None:
    """Set the fallback order for `lora fetch` and `lora mirror sync`: the first is tried first."""
    from loracli.hub import mirrors

    chosen = mirrors.use(names)
    output.note("mirror order: " + " → ".join(f"{m.name} ({m.url})" for m in chosen))
    output.emit([m.to_dict() for m in chosen], json, lambda r: None)


@app.command()
def test(
    names: Optional[List[str]] = typer.Argument(None, help="Mirrors to test (default: all).",
                                                autocompletion=_complete),
    model: str = typer.Option("sd15", "--model", help="Model whose small file is asked for."),
    file: str = typer.Option("model_index.json", "--file", help="That small file."),
    timeout: float = typer.Option(10.0, "--timeout", help="Seconds before a mirror counts as down."),
    json: bool = JsonOpt,
) -> None:
    """Does each mirror answer (and if not, why: DNS, refused, TLS, stall), how fast, and does it
    serve a small known file? Exit 1 when none does."""
    from concurrent.futures import ThreadPoolExecutor

    from loracli.errors import LoraError
    from loracli.hub import health, mirrors

    chosen = [mirrors.get(n) for n in names] if names else list(mirrors.all_mirrors().values())
    with ThreadPoolExecutor(max_workers=8) as pool:
        rows = list(pool.map(lambda m: _retired(m) or health.probe(m, model, file, timeout), chosen))
    if not any(r["serves_file"] for r in rows):
        if not json:
            _render_test(rows)
        raise LoraError(f"no mirror serves {file} of {model} from here",
                        "lora mirror add NAME https://…   (a mirror that answers on this network; "
                        "the rows above say why each failed)", data=rows)
    output.emit(rows, json, _render_test)


def _retired(m) -> dict | None:
    return {"name": m.name, "url": m.url, "kind": m.kind, "state": "retired", "reachable": False,
            "latency_ms": None, "serves_file": False, "error": f"retired: {m.retired}",
            "retired": m.retired} if m.retired else None


def _render_test(rows: list[dict]) -> None:
    shown = [{**r, "reachable": "yes" if r["reachable"] else "no",
              "latency": f"{r['latency_ms']:.0f} ms" if r["latency_ms"] is not None else "",
              "serves file": "yes" if r["serves_file"] else "no",
              "note": r["error"]} for r in rows]
    output.table(shown, ["name", "kind", "reachable", "latency", "serves file", "note"])


@app.command()
def sync(
    models: Optional[List[str]] = typer.Argument(None, help="Tracked models to sync (default: all)."),
    mirror: MirrorOpt = None,
    wait: bool = typer.Option(False, "--wait", help="Queue behind a running sync instead of exiting 2."),
    publish: Optional[Path] = typer.Option(None, "--publish", help="Also write a files-kind tree "
                                           "(files + manifest) here, for a static web server."),
    strict: bool = typer.Option(False, "--strict", help="No fallback to other mirrors."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds before a stalled mirror is left."),
    prune: bool = typer.Option(False, "--prune", help="Delete a changed model's old snapshots and "
                               "unused files (not while something still reads them)."),
    json: bool = JsonOpt,
) -> None:
    """Bring every tracked model to its mirror's current commit (cron-friendly; exit 1 if any failed)."""
    from loracli.hub import sync as sync_lib
    from loracli.ui.hubview import Reporter

    reporter = Reporter()
    try:
        result = sync_lib.sync(models or None, mirror=mirror, wait=wait, publish=publish,
                               strict=strict, timeout=timeout, prune=prune, on_event=reporter)
    finally:
        reporter.close()
    output.emit(result, json, lambda r: _render_status(r["models"]))
    if not result["ok"]:
        raise typer.Exit(1)


@app.command()
def status(json: bool = JsonOpt) -> None:
    """The last sync of each tracked model (tunasync-style)."""
    from loracli.hub import sync as sync_lib

    rows = sync_lib.status_rows()
    if not rows and not json:
        output.note("no sync has run yet; try `lora mirror sync`")
    output.emit(rows, json, _render_status)


def _render_status(rows: list[dict]) -> None:
    from loracli.ui.hubview import human_size

    shown = [{**r, "commit": (r.get("commit") or "")[:7], "size": human_size(r.get("size") or 0),
              "last_update": r.get("last_update") or "never", "error": r.get("error_msg", "")}
             for r in rows]
    output.table(shown, ["name", "status", "commit", "size", "last_update", "last_ended", "error"])
