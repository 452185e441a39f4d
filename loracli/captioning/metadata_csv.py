"""`metadata.csv`: the captions of a folder of images, in the Hugging Face imagefolder layout.

    file_name,text[,any other columns]
    a.png,"sks, red square"

The one reader of the file: the trainer (`loracli.training.dataset`) takes its captions from it, and
`lora caption` (`loracli.captioning.files`) rewrites it keeping the other columns. Every problem with
it is one `LoraError` naming the file and the line.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from loracli.errors import LoraError

NAME = "metadata.csv"


def _error(path: Path, line: int, problem: str) -> LoraError:
    return LoraError(f"{path}, line {line}: {problem}",
                     f"fix it (a header `file_name,text`, then one row per image) or delete "
                     f"{path} to use caption files")


def read(folder: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of `folder/metadata.csv`; ([], []) when there is none."""
    path = Path(folder) / NAME
    if not path.is_file():
        return [], []
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _error(path, 1, f"unreadable ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _error(path, line, "not UTF-8 text") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        columns = list(reader.fieldnames or [])
        if "file_name" not in columns:
            found = ", ".join(columns) if columns else "nothing"
            raise _error(path, 1, f"needs a file_name column (and text); the header has {found}")
        rows = [dict(row) for row in reader]
    except csv.Error as e:
        raise _error(path, reader.line_num, f"not valid CSV ({e})") from None
    return columns, rows


def captions(folder: Path) -> dict[str, str]:
    """{file_name: caption} of `folder/metadata.csv` (stripped; {} when there is none)."""
    _, rows = read(folder)
    return {(row.get("file_name") or "").strip(): (row.get("text") or "").strip()
            for row in rows if (row.get("file_name") or "").strip()}
