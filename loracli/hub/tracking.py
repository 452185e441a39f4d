"""Tracked models: what `lora fetch` put in the cache, so `mirror sync` and `cache` can follow it.

One JSON file, `state_dir()/models.json`, written atomically under a lock:
    {"models": {"<repo_id>@<revision>": {alias, name, repo_id, revision, include, exclude, variant,
                 mirror, commit, size, files: {path: {size, sha256, oid, blob}}, fetched_at,
                 last_sync}}}
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

from loracli import atomic, paths
from loracli.errors import LoraError


def _file() -> Path:
    return paths.state_dir() / "models.json"


@contextmanager
def _locked():
    from filelock import FileLock

    path = _file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def now_iso(ts: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if ts is None else ts))


def load() -> dict[str, dict]:
    path = _file()
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text("utf-8")).get("models", {})
    except (OSError, ValueError) as e:
        raise LoraError(f"{path}: unreadable ({e})",
                        f"move {path} away; `lora fetch MODEL` records models again") from None


def key(repo_id: str, revision: str) -> str:
    return f"{repo_id}@{revision}"


def save(record: dict) -> dict:
    """Add or replace one record (keyed by repo and revision)."""
    with _locked():
        data = load()
        k = key(record["repo_id"], record["revision"])
        old = data.get(k, {})
        record = {**old, **record}
        data[k] = record
        atomic.write_json(_file(), {"models": data})
    return record


def update(k: str, **fields) -> None:
    with _locked():
        data = load()
        if k in data:
            data[k].update(fields)
            atomic.write_json(_file(), {"models": data})


def remove(repo_id: str) -> list[str]:
    """Forget every record of a repo; returns the keys removed."""
    with _locked():
        data = load()
        gone = [k for k, r in data.items() if r["repo_id"] == repo_id]
        for k in gone:
            del data[k]
        atomic.write_json(_file(), {"models": data})
    return gone


def find(model: str) -> list[tuple[str, dict]]:
    """Records matching a name the user typed: alias, repo id, `repo@rev`, or `alias@rev`."""
    from loracli.hub import models

    ref = models.resolve(model)
    found = []
    for k, r in load().items():
        if r["repo_id"] != ref.repo_id:
            continue
        if "@" in model and r["revision"] != ref.revision:
            continue
        found.append((k, r))
    return found
