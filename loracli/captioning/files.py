"""The files `lora caption` reads and writes beside the images: a caption file per image and a
`metadata.csv` per folder (read through `loracli.captioning.metadata_csv`), always written atomically.

An image's existing caption is the newer of its metadata.csv row and its caption file, so a
hand edit to either is what is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loracli import atomic
from loracli.captioning import metadata_csv


@dataclass
class Entry:
    """One image: where its caption goes and the caption it already has (if any)."""

    image: Path
    caption_file: Path
    existing: str | None  # the newer of its metadata.csv row and caption file, else None
    text: str | None = None  # the caption it ends with
    status: str = "pending"  # captioned | kept | failed
    error: str = ""


def plan(folder: Path, images: list[Path], ext: str) -> list[Entry]:
    """Each image with its caption file and the caption it already has: the newer of its
    metadata.csv row and its caption file, so a hand edit to either is what is kept (and
    the rewritten metadata.csv carries an edited caption file to the trainer, which reads
    metadata.csv first)."""
    rows_by_dir: dict[Path, tuple[dict[str, str], float]] = {}
    entries = []
    for image in images:
        if image.parent not in rows_by_dir:
            rows = metadata_csv.captions(image.parent)
            meta = image.parent / metadata_csv.NAME
            rows_by_dir[image.parent] = (rows, meta.stat().st_mtime if rows else 0.0)
        rows, meta_mtime = rows_by_dir[image.parent]
        caption_file = image.with_suffix(ext)
        existing = rows.get(image.name)
        if caption_file.is_file() and (not existing or caption_file.stat().st_mtime > meta_mtime):
            existing = caption_file.read_text("utf-8", errors="replace").strip() or existing
        entries.append(Entry(image, caption_file, existing or None))
    return entries


def metadata_text(columns: list[str], old_rows: list[dict], entries: list[Entry]) -> str:
    """metadata.csv for one folder: a row per image with a caption, in file order; other
    columns and rows naming files we did not see (e.g. `sub/x.png`) are kept as they were."""
    import csv
    import io

    columns = ["file_name", "text", *(c for c in columns if c not in ("file_name", "text"))]
    old = {r.get("file_name", "").strip(): r for r in old_rows}
    ours = {e.image.name for e in entries}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for e in entries:
        if e.text:
            writer.writerow({**old.get(e.image.name, {}), "file_name": e.image.name, "text": e.text})
    for name, row in old.items():
        if name and name not in ours:
            writer.writerow(row)
    return buf.getvalue()


def write_metadata(entries: list[Entry]) -> list[Path]:
    """One metadata.csv per folder that holds images with a caption; each written atomically."""
    by_dir: dict[Path, list[Entry]] = {}
    for e in entries:
        by_dir.setdefault(e.image.parent, []).append(e)
    written = []
    for folder, group in by_dir.items():
        if not any(e.text for e in group):
            continue
        columns, rows = metadata_csv.read(folder)
        text, path = metadata_text(columns, rows, group), folder / metadata_csv.NAME
        if not path.is_file() or path.read_text("utf-8-sig", errors="replace") != text:
            atomic.write_text(path, text)
        written.append(path)
    return written


def write_captions(entries: list[Entry]) -> None:
    """The caption file of every captioned entry."""
    for e in entries:
        if e.status == "captioned" and e.text is not None:
            atomic.write_text(e.caption_file, e.text + "\n")
