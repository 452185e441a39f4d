"""The cached models as a whole: list them, re-hash them, remove or prune them.

Reads the Hugging Face layout directly (`loracli.hub.hubcache`), so a damaged model (a blob deleted
by `verify`, a dangling snapshot link) still shows up, as damaged, until `lora fetch` repairs it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from loracli import hashing, paths
from loracli.errors import LoraError
from loracli.hub import hubcache, models, tracking

_REPO_DIR_RE = re.compile(r"^models--([\w.\-]+)--([\w.\-]+)$")


def verify_blob(path: Path, name: str, size: int | None = None) -> str | None:
    """Re-hash a cached blob against its name (sha256, or the git oid of a small file); returns
    a problem, or None when it is intact (or its name is no digest, so there is nothing to check)."""
    try:
        st = path.stat()
    except OSError:
        return "missing (run the fetch again)"
    if size is not None and st.st_size != size:
        return f"size {st.st_size}, expected {size}"
    if len(name) == 64:
        h = hashlib.sha256()
    elif len(name) == 40:
        h = hashlib.sha1(b"blob %d\0" % st.st_size)
    else:
        return None
    digest = hashing.digest_file(path, h, 8 << 20)
    return None if digest == name else f"digest {digest[:12]}… does not match {name[:12]}…"


def _refs(repo_dir: Path) -> dict[str, str]:
    refs = {}
    for p in sorted((repo_dir / "refs").rglob("*")) if (repo_dir / "refs").is_dir() else ():
        try:
            sha = p.read_text("utf-8").strip() if p.is_file() else ""
        except OSError:
            continue
        if hubcache.SHA1_RE.match(sha):
            refs[p.relative_to(repo_dir / "refs").as_posix()] = sha
    return refs


def _snapshot_files(snap: Path) -> list[str]:
    if not snap.is_dir():
        return []
    return sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*")
                  if (p.is_file() or p.is_symlink()) and not (p.name.startswith(".") and p.name.endswith(".lnk")))


def _repos(cache: Path) -> list[tuple[str, Path]]:
    try:
        entries = sorted(os.listdir(cache))
    except OSError:
        return []
    found = []
    for entry in entries:
        m = _REPO_DIR_RE.match(entry)
        if m and (cache / entry).is_dir():
            found.append((f"{m.group(1)}/{m.group(2)}", cache / entry))
    return found


def cached() -> list[dict]:
    """Every model in the cache, joined with what `lora fetch` tracked; `missing` counts the
    snapshot files whose bytes are gone (damaged until fetched again)."""
    cache = paths.cache_dir()
    tracked = tracking.load()
    rows = []
    for repo_id, repo_dir in _repos(cache):
        recs = [r for r in tracked.values() if r["repo_id"] == repo_id]
        rec = recs[0] if recs else {}
        refs = _refs(repo_dir)
        snapshots = [p.name for p in (repo_dir / "snapshots").iterdir() if hubcache.SHA1_RE.match(p.name)] \
            if (repo_dir / "snapshots").is_dir() else []
        commit = rec.get("commit") or refs.get("main") or next(iter(refs.values()), "") \
            or (snapshots[0] if snapshots else "")
        snap = repo_dir / "snapshots" / commit
        files = _snapshot_files(snap) if commit else []
        missing = sum(1 for f in files if not (snap / f).exists())
        size = sum(p.stat().st_size for p in (repo_dir / "blobs").iterdir() if p.is_file()) \
            if (repo_dir / "blobs").is_dir() else 0
        rows.append({
            "model": rec.get("name") or repo_id, "repo_id": repo_id, "commit": commit,
            "revisions": len(snapshots), "files": len(files), "missing": missing, "size": size,
            "last_sync": rec.get("last_sync") or rec.get("fetched_at", ""),
            "tracked": bool(rec), "path": str(repo_dir),
        })
    return rows


def verify(model: str | None = None, repair: bool = True) -> list[dict]:
    """Re-hash the snapshot files of one model (or all); a corrupt blob is deleted when `repair`,
    so the next `lora fetch` downloads it again (and until then it is reported missing).
    One dict per model: model, commit, files, bad [{path, problem}], ok."""
    cache = paths.cache_dir()
    if model:
        ref = models.resolve(model)
        targets = [(ref.name, ref.repo_id, hubcache.commit_for(ref.repo_id, ref.revision, cache))]
        if targets[0][2] is None:
            raise LoraError(f"{model} is not in the model cache ({cache})", f"lora fetch {model}")
    else:
        targets = [(r["model"], r["repo_id"], r["commit"]) for r in cached() if r["commit"]]
    tracked = {(r["repo_id"], r["commit"]): r for r in tracking.load().values()}
    reports = []
    for name, repo_id, commit in targets:
        repo_dir = hubcache.repo_folder(repo_id, cache)
        snap = hubcache.snapshot_dir(repo_dir, commit)
        expected = tracked.get((repo_id, commit), {}).get("files") or {}
        files = sorted(set(expected) | set(_snapshot_files(snap)))
        bad = []
        for rel in files:
            meta = expected.get(rel, {})
            blob = Path(os.path.realpath(snap / rel))
            problem = verify_blob(blob, meta.get("blob") or blob.name, meta.get("size"))
            if problem:
                bad.append({"path": rel, "problem": problem})
                if repair and blob.is_file() and blob.parent == Path(os.path.realpath(repo_dir / "blobs")):
                    blob.unlink()
                    bad[-1]["problem"] += "; deleted"
        reports.append({"model": name, "repo_id": repo_id, "commit": commit, "files": len(files),
                        "bad": bad, "ok": not bad})
    return reports


def damage(reports: list[dict]) -> LoraError | None:
    """The error for damaged models in `verify`'s reports (None when all are intact)."""
    damaged = [r for r in reports if not r["ok"]]
    if not damaged:
        return None
    files = sum(len(r["bad"]) for r in damaged)
    fix = [f"lora fetch {r['model']}" for r in damaged]
    return LoraError(f"{files} damaged file(s) in {', '.join(r['model'] for r in damaged)}",
                     fix[0] + (f"   (then: {'; '.join(fix[1:])})" if fix[1:] else ""),
                     [f"{r['model']}: {b['path']}: {b['problem']}" for r in damaged for b in r["bad"]],
                     data=reports)


def remove(model: str, dry_run: bool = False) -> dict:
    """Delete a model's folder from the cache (all its revisions) and forget its records."""
    ref = models.resolve(model)
    cache = paths.cache_dir()
    repo_dir = hubcache.repo_folder(ref.repo_id, cache)
    if not repo_dir.exists():
        raise LoraError(f"{model} is not in the model cache ({cache})", "lora cache list")
    hubcache.inside(cache, repo_dir)
    blobs = repo_dir / "blobs"
    size = sum(p.stat().st_size for p in blobs.iterdir() if p.is_file()) if blobs.is_dir() else 0
    revisions = sorted(p.name for p in (repo_dir / "snapshots").glob("*"))
    result = {"model": ref.name, "repo_id": ref.repo_id, "path": str(repo_dir), "freed": size,
              "revisions": revisions, "dry_run": dry_run}
    if dry_run:
        return result
    with hubcache.model_lock(repo_dir):
        trash = hubcache.inside(cache, repo_dir.with_name(f".{repo_dir.name}.removing-{os.getpid()}"))
        os.replace(repo_dir, trash)  # atomic: readers see all of it or none
        _delete(trash)
    tracking.remove(ref.repo_id)
    return result


def prune(repo_id: str) -> int:
    """Delete snapshots no ref points at, and blobs no remaining snapshot uses; bytes freed.

    For `lora mirror sync --prune`: a model that changed upstream keeps only its current commit.
    """
    cache = paths.cache_dir()
    repo_dir = hubcache.repo_folder(repo_id, cache)
    if not repo_dir.is_dir():
        return 0
    freed = 0
    with hubcache.model_lock(repo_dir):
        live = set(_refs(repo_dir).values())
        for snap in (repo_dir / "snapshots").iterdir():
            if snap.name not in live:
                _delete(hubcache.inside(repo_dir, snap))
        used = {os.path.realpath(p) for p in (repo_dir / "snapshots").rglob("*") if p.is_symlink()}
        for blob in (repo_dir / "blobs").iterdir():
            if str(blob.resolve()) not in used and not blob.name.endswith(".incomplete"):
                freed += blob.stat().st_size
                hubcache.inside(repo_dir, blob).unlink()
    return freed


def _delete(path: Path) -> None:
    """Remove a folder of the cache; a link in its place is removed, never followed."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)
