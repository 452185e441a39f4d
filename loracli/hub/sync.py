"""`lora mirror sync`: bring every tracked model up to its mirror's current commit, from cron.

It follows tunasync's model: per model a status (`syncing`, `success`, `failed`), `last_update`
(changes only on success), `last_started`, `last_ended`, `upstream`, `commit`, `size` and
`error_msg`, saved atomically in `state_dir()/sync-status.json` after every change. One sync at a
time: an exclusive lock, and a second sync gets `BusyError` (exit 2) unless it waits. An unchanged
model transfers nothing (its blobs are all there); a changed one transfers only the files whose
content changed (blobs are named by digest), verified, and then its ref moves.

`publish` also writes a files-kind mirror tree that any static web server can serve:
    DIR/lora-mirror.json                      {"kind": "files", "models": {repo_id: commit}}
    DIR/{org}/{name}/{path}                   the files (hard links to the cache where possible)
    DIR/{org}/{name}/lora-manifest.json       {repo_id, revision, commit, files: [{path, size,
                                               sha256, oid, lfs}]}
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from loracli import atomic, paths
from loracli.errors import BusyError, LoraError
from loracli.hashing import sha256_file
from loracli.hub import hubcache, modelcache, tracking

TRIES = 2


def status_file() -> Path:
    return paths.state_dir() / "sync-status.json"


def load_status() -> dict[str, dict]:
    try:
        return json.loads(status_file().read_text("utf-8")).get("models", {})
    except FileNotFoundError:
        return {}
    except (OSError, ValueError):
        return {}


def _save_status(entries: dict) -> None:
    atomic.write_json(status_file(), {"models": entries})


def _stamp(entry: dict, field: str, ts: float) -> None:
    entry[field] = tracking.now_iso(ts)
    entry[field + "_ts"] = int(ts)


def _select(names: list[str] | None) -> list[tuple[str, dict]]:
    records = tracking.load()
    if not names:
        if not records:
            raise LoraError("no tracked models to sync", "lora fetch sd15   (fetched models are tracked)")
        return sorted(records.items())
    chosen = []
    for name in names:
        found = tracking.find(name)
        if not found:
            raise LoraError(f"{name} is not tracked", f"lora fetch {name}")
        chosen += [f for f in found if f not in chosen]
    return chosen


def sync(names: list[str] | None = None, *, mirror: str | None = None, wait: bool = False,
         publish: Path | None = None, strict: bool = False, timeout: float | None = None,
         prune: bool = False, on_event: Callable[[dict], None] | None = None) -> dict:
    """Sync tracked models (all, or `names`); returns {"ok", "models": [status entries]}."""
    from filelock import FileLock, Timeout

    from loracli.hub import client as hub

    event = on_event or (lambda e: None)
    lock_path = paths.state_dir() / "sync.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=-1 if wait else 0)
    except Timeout:
        raise BusyError(f"another `lora mirror sync` is running (lock {lock_path})",
                        "let it finish, or queue behind it: lora mirror sync --wait") from None
    try:
        selected = _select(names)
        status = load_status()
        done = []
        for key, record in selected:
            name = record.get("name") or key
            entry = status.setdefault(name, {"name": name, "status": "none", "last_update": None,
                                             "last_update_ts": None, "error_msg": ""})
            entry["status"] = "syncing"
            _stamp(entry, "last_started", time.time())
            _save_status(status)
            event({"event": "note", "message": f"syncing {name}"})
            previous = record.get("commit")
            for attempt in range(1, TRIES + 1):
                try:
                    result = hub.fetch(record.get("alias") or record["repo_id"], revision=record["revision"],
                                       include=record.get("include") or (), exclude=record.get("exclude") or (),
                                       variant=record.get("variant"), mirror=mirror or record.get("mirror"),
                                       strict=strict, timeout=timeout, on_event=event, allow_stale=False)
                    entry.update(status="success", error_msg="", commit=result["commit"],
                                 previous_commit=previous, changed=result["commit"] != previous,
                                 size=result.get("size", 0), transferred=result.get("downloaded", 0),
                                 upstream=result.get("mirror"))
                    now = time.time()
                    _stamp(entry, "last_update", now)
                    _stamp(entry, "last_ended", now)
                    tracking.update(key, last_sync=entry["last_update"])
                    if prune and entry["changed"]:
                        entry["pruned"] = modelcache.prune(record["repo_id"])
                    if publish is not None:
                        publish_model(Path(publish), tracking.load()[key])
                    break
                except LoraError as e:
                    if attempt < TRIES and not isinstance(e, BusyError):
                        event({"event": "note", "message": f"{name}: {e.message}; try {attempt + 1}"})
                        continue
                    entry.update(status="failed",
                                 error_msg="; ".join([e.message, *e.details])[:2000])
                    _stamp(entry, "last_ended", time.time())
            _save_status(status)
            done.append(dict(entry))
        if publish is not None:
            write_index(Path(publish))
        return {"ok": all(e["status"] == "success" for e in done), "models": done}
    finally:
        lock.release()


def status_rows() -> list[dict]:
    return [load_status()[k] for k in sorted(load_status())]


# --- publishing a files-kind tree -------------------------------------------------------------

def _place(src: Path, dest: Path) -> None:
    """Put `src`'s bytes at `dest` atomically: a hard link where possible, else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def publish_model(dest: Path, record: dict) -> dict:
    """Write one tracked model into a files-kind tree; the manifest goes last."""
    repo_dir = hubcache.repo_folder(record["repo_id"])
    repo_root = hubcache.inside(dest, dest / record["repo_id"])
    snap = hubcache.snapshot_dir(repo_dir, record["commit"])
    manifest_path = repo_root / "lora-manifest.json"
    try:
        old = {f["path"]: f for f in json.loads(manifest_path.read_text("utf-8"))["files"]}
    except (OSError, ValueError, KeyError, TypeError):
        old = {}
    files = []
    for rel, meta in sorted(record["files"].items()):
        src = hubcache.inside(repo_dir.parent, Path(os.path.realpath(snap / hubcache.check_rel_path(rel))))
        out = hubcache.inside(repo_root, repo_root / rel)
        sha256 = meta.get("sha256") or sha256_file(src)
        prior = old.get(rel)
        if not (prior and prior.get("sha256") == sha256 and out.is_file()
                and out.stat().st_size == meta["size"]):
            _place(src, out)
        files.append({"path": rel, "size": meta["size"], "sha256": sha256, "oid": meta.get("oid"),
                      "lfs": bool(meta.get("sha256"))})
    manifest = {"repo_id": record["repo_id"], "revision": record["revision"],
                "commit": record["commit"], "files": files}
    atomic.write_json(manifest_path, manifest)
    for rel in set(old) - {f["path"] for f in files}:  # the old manifest is outside input too
        try:
            hubcache.inside(repo_root, repo_root / hubcache.check_rel_path(rel)).unlink(missing_ok=True)
        except LoraError:
            continue
    return manifest


def write_index(dest: Path) -> None:
    found = {}
    for manifest in sorted(dest.glob("*/*/lora-manifest.json")):
        try:
            data = json.loads(manifest.read_text("utf-8"))
            found[data["repo_id"]] = data["commit"]
        except (OSError, ValueError, KeyError):
            continue
    atomic.write_json(dest / "lora-mirror.json", {"kind": "files", "models": found,
                                                  "updated": tracking.now_iso()})
