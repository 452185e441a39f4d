"""`lora fetch MODEL`: download a model into the cache through the chosen mirror, verified."""

from __future__ import annotations

from typing import List, Optional

import typer

from loracli.ui import output
from loracli.ui.hubview import Reporter, human_size


def _model_names(incomplete: str) -> list[str]:
    from loracli.hub import models

    return models.complete_name(incomplete)


def _mirror_names(incomplete: str) -> list[str]:
    from loracli.hub import mirrors

    return [n for n in mirrors.names() if n.startswith(incomplete)]


def fetch(
    model: str = typer.Argument(..., help="Alias (sd15, sd21, sd21-base, sdxl, clip-vit-l-14, "
                                "tiny-sd), org/name[@revision], or a hub URL.",
                                autocompletion=_model_names),
    mirror: Optional[str] = typer.Option(None, "--mirror", "-m", help="Mirror name or URL to try "
                                         "first (then the order of `lora mirror use`, or LORA_MIRROR).",
                                         autocompletion=_mirror_names),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch, tag or commit sha."),
    include: Optional[List[str]] = typer.Option(None, "--include", help="Glob of files to take "
                                                "(repeatable; default: the diffusers folders, safetensors)."),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="Glob of files to skip (repeatable)."),
    variant: Optional[str] = typer.Option(None, "--variant", help="Weights variant, e.g. fp16."),
    strict: bool = typer.Option(False, "--strict", help="Use only the chosen mirror: no fallback."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List files and sizes; download nothing."),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, max=32, help="Files downloaded in parallel."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Seconds with no data, or under "
                                            "10 KB/s (LORA_MIN_SPEED), before a mirror counts as stalled "
                                            "and is left (default 30, or LORA_TIMEOUT)."),
    json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Download a model into the cache: resumable, sha256-verified, with mirror fallback."""
    from loracli.hub import client as hub

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
        output.table([{**f, "size": human_size(f["size"]), "cached": "yes" if f["cached"] else ""}
                      for f in r["files"]], ["path", "size", "cached"])
        output.note(f"{r['repo_id']}@{r['commit'][:7]} via {r['mirror']}: {len(r['files'])} files, "
                    f"{human_size(r['size'])}; {human_size(r['to_download'])} to download")
        return
    if r.get("mirror") == "local build" and not r.get("cached"):
        output.note(f"{r['model']}: built locally ({len(r['files'])} files, {human_size(r['size'])}), no network")
    elif r.get("cached"):
        output.note(f"{r['model']} already cached ({r['commit'][:7]}); nothing transferred")
    else:
        output.note(f"{r['model']}: {len(r['files'])} files, {human_size(r['size'])} at {r['commit'][:7]} "
                    f"({human_size(r['downloaded'])} transferred via {r['mirror']}), verified")
    print(r["snapshot"])
