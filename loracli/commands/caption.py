"""`lora caption DIR`: label a folder of images with CLIP (open_clip), offline."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from loracli.ui import output
from loracli.ui.options import JsonOpt


def caption(
    folder: Path = typer.Argument(..., help="Folder of images to caption."),
    model: str = typer.Option("ViT-L-14", "--model", help="open_clip architecture."),
    weights: str = typer.Option(
        "openai", "--weights",
        help="open_clip weights: a tag (from the model cache), a weights file, local-dir:FOLDER "
             "or hf-hub:ORG/NAME (cached)."),
    labels: Optional[List[str]] = typer.Option(
        None, "--labels", help="Label bank: a TOML file or built-in name (repeatable; default: default)."),
    prefix: str = typer.Option("", "--prefix", help="Trigger word/prefix put first in every caption."),
    ext: str = typer.Option(".txt", "--ext", help="Caption file extension (.txt, .caption)."),
    existing: str = typer.Option("skip", "--existing",
                                 help="Images that already have a caption: skip, overwrite, append."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Caption subfolders too."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print captions; write nothing."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Images encoded at once."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 (default: cuda when present)."),
    json: JsonOpt = False,
) -> None:
    """Caption images with CLIP labels: a caption file beside each image and metadata.csv.

    Weights come from the model cache only (`lora fetch clip-vit-l-14`); nothing is downloaded.
    """
    from loracli.captioning import job as captioning

    options = captioning.Options(
        labels=tuple(labels or ()), model=model, weights=weights, prefix=prefix, ext=ext,
        existing=existing, recursive=recursive, dry_run=dry_run, batch_size=batch_size,
        device=device)
    with output.Progress("captioning", enabled=output.is_terminal() and not json) as bar:
        result = captioning.caption_folder(folder, options, on_progress=bar.update)
    output.emit(result, json, _render)


def _render(result: dict) -> None:
    if result["dry_run"]:
        for c in result["captions"]:
            print(f"{c['file']}\t{c['text']}")
    else:
        rows = [{"tag": t, "images": n} for t, n in result["tag_frequency"].items()]
        output.table(rows, ["tag", "images"], title="tag frequency")
    done = "would caption" if result["dry_run"] else "captioned"
    output.note(f"{done} {result['captioned']} of {result['images']} image(s); "
                f"kept {result['kept']} existing caption(s)"
                + (f"; wrote {', '.join(result['metadata'])}" if result["metadata"] else ""))
    for f in result["failed"]:
        output.warn(f"skipped {f['error']}")

