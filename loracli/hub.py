"""What to fetch and from where: list a model on a mirror, pick its files, fetch it, probe mirrors.

Why not `huggingface_hub.snapshot_download` alone (see reference/hub.md): it does not resume a
download killed in an earlier run, it checks sizes only, it reads `HF_ENDPOINT`/`HF_HUB_OFFLINE`
once at import, and its Xet path fetches bytes around a mirror. So here:
- the commit sha is pinned first (`/api/models/{repo}/revision/{rev}`), the file list with
  sha256 comes from the recursive tree (or a files-kind mirror's manifest);
- `loracli.download` moves the bytes: resumable, verified before a blob enters the cache,
  parallel; the snapshot links and `refs/<revision>` come last;
- a per-model file lock makes two processes end with one correct copy; mirrors are tried in order
  (chosen, then fallbacks), each switch reported; the endpoint is passed per request.
The result is the Hugging Face cache layout, so `from_pretrained(..., local_files_only=True)`,
`hf_hub_download` offline and open_clip read it. This module and `download` are the only
network code.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

from loracli import mirrors, models, paths, tracking
from loracli.download import (RETRIES, Client, Events, Fetcher, MirrorError, RemoteFile,  # noqa: F401
                              _check_status, _token, file_url)
from loracli.errors import LoraError
from loracli.mirrors import Mirror

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5")


@dataclass
class Listing:
    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]
    source: Mirror



# --- listing ---------------------------------------------------------------------------------

def _files_from_tree(entries: list) -> list[RemoteFile]:
    files = []
    for e in entries:
        if e.get("type") != "file":
            continue
        path = e["path"]
        try:
            models.check_rel_path(path)
        except LoraError as err:
            raise MirrorError(err.message, True) from None
        lfs = e.get("lfs") or {}
        if not (lfs.get("oid") or e.get("oid")):
            raise MirrorError(f"no sha256 or git oid listed for {path}: it could not be verified", True)
        files.append(RemoteFile(path, int(e.get("size", lfs.get("size", 0))), lfs.get("oid"), e.get("oid")))
    return files


def list_hub(client: Client, mirror: Mirror, ref: models.ModelRef) -> Listing:
    rev = quote(ref.revision, safe="")
    info, _ = client.get_json(mirror, f"{mirror.url}/api/models/{ref.repo_id}/revision/{rev}")
    commit = str(info.get("sha") or "")
    if len(commit) != 40:
        raise MirrorError("revision answer has no commit sha", True)
    url = f"{mirror.url}/api/models/{ref.repo_id}/tree/{commit}?recursive=true&expand=false"
    entries: list = []
    while url:
        page, headers = client.get_json(mirror, url)
        entries.extend(page)
        url = _next_link(headers.get("Link", ""))
    return Listing(ref.repo_id, ref.revision, commit, _files_from_tree(entries), mirror)


def _next_link(link: str) -> str | None:
    for part in link.split(","):
        if 'rel="next"' in part and "<" in part:
            return part[part.index("<") + 1 : part.index(">")]
    return None


def list_files_mirror(client: Client, mirror: Mirror, ref: models.ModelRef) -> Listing | None:
    """From `{url}/{repo}/lora-manifest.json`; None when the mirror has no manifest."""
    try:
        data, _ = client.get_json(mirror, f"{mirror.url}/{ref.repo_id}/lora-manifest.json")
    except MirrorError as e:
        if "404" in str(e):
            return None
        raise
    commit = str(data.get("commit", ""))
    if ref.revision not in (data.get("revision", "main"), commit):
        raise MirrorError(f"serves {data.get('revision', 'main')} ({commit[:7]}) only, "
                          f"not {ref.revision}", True)
    entries = [{"type": "file", "path": f["path"], "size": f["size"], "oid": f.get("oid"),
                "lfs": {"oid": f["sha256"]} if f.get("sha256") and (f.get("lfs", True) or not f.get("oid"))
                else None} for f in data["files"]]
    return Listing(ref.repo_id, ref.revision, commit, _files_from_tree(entries), mirror)


def variant_of(path: str) -> str | None:
    """`unet/diffusion_pytorch_model.fp16.safetensors` → fp16 (also for `.index.fp16.json`)."""
    parts = path.rsplit("/", 1)[-1].split(".")
    if len(parts) >= 3 and parts[-1] in {s[1:] for s in WEIGHT_SUFFIXES}:
        return parts[-2]
    if len(parts) >= 4 and parts[-1] == "json" and parts[-3] == "index":
        return parts[-2]
    return None


def select(files: list[RemoteFile], include, exclude=(), variant: str | None = None) -> list[RemoteFile]:
    """The files a fetch takes: matching `include`, not `exclude`, and the weights of one variant
    (per folder, `variant` files where there are some, the plain ones otherwise)."""
    chosen = [f for f in files if models.matches(f.path, include, exclude)]
    with_variant = {f.path.rpartition("/")[0] for f in chosen if variant and variant_of(f.path) == variant}
    keep = []
    for f in chosen:
        v = variant_of(f.path)
        folder = f.path.rpartition("/")[0]
        if v is None and not (folder in with_variant and _is_weight(f.path)):
            keep.append(f)
        elif v is not None and v == variant:
            keep.append(f)
    return keep


def _is_weight(path: str) -> bool:
    return path.endswith(WEIGHT_SUFFIXES) or path.endswith(".index.json")


# --- the fetch -------------------------------------------------------------------------------

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def model_lock(repo_dir: Path):
    from filelock import FileLock

    locks = repo_dir.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return FileLock(str(locks / f"{repo_dir.name}.lora.lock"))


def find_listing(client: Client, ref: models.ModelRef, chain: list[Mirror], event: Events):
    """Ask each mirror in order; returns (listing, the mirrors left to download from, reasons)."""
    reasons, sources = [], []
    for i, mirror in enumerate(chain):
        nxt = chain[i + 1].name if i + 1 < len(chain) else None
        if mirror.retired:
            reasons.append(f"{mirror.name}: retired ({mirror.retired})")
            event({"event": "fallback", "mirror": mirror.name, "next": nxt,
                   "reason": f"retired ({mirror.retired})"})
            continue
        try:
            if client.kind(mirror) == "files":
                listing = list_files_mirror(client, mirror, ref)
                sources.append(mirror)
                if listing is None:  # bytes only: the list and hashes come from a hub mirror
                    event({"event": "note", "message": f"{mirror.name} has no manifest; "
                           "taking the file list and sha256 from the next hub mirror"})
                    continue
            else:
                listing = list_hub(client, mirror, ref)
                sources.append(mirror)
            sources += [m for m in chain[i + 1:] if not m.retired]
            return listing, sources, reasons
        except MirrorError as e:
            reasons.append(f"{mirror.name}: {e}")
            if mirror in sources:
                sources.remove(mirror)
            event({"event": "fallback", "mirror": mirror.name, "next": nxt, "reason": str(e)})
    return None, sources, reasons


def _complete(repo_dir: Path, commit: str, files: list[RemoteFile]) -> bool:
    snap = repo_dir / "snapshots" / commit
    return all((snap / f.path).exists() and (repo_dir / "blobs" / f.blob).exists() for f in files)


def _cached(ref: models.ModelRef, repo_dir: Path, **extra) -> dict | None:
    """The result for a model already in the cache at its revision, or None."""
    commit = models.commit_for(ref.repo_id, ref.revision, repo_dir.parent)
    if not commit or not (repo_dir / "snapshots" / commit).is_dir():
        return None
    return {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision, "commit": commit,
            "snapshot": str(repo_dir / "snapshots" / commit), "cached": True, "downloaded": 0, **extra}


def fetch(model: str, *, mirror: str | None = None, revision: str | None = None,
          include=(), exclude=(), variant: str | None = None, strict: bool = False,
          dry_run: bool = False, workers: int = 4, timeout: float | None = None,
          on_event: Events | None = None, allow_stale: bool = True) -> dict:
    """Fetch `model` into the cache (verified, resumable); returns what was done.

    `allow_stale`: when no mirror answers, a cached copy counts as success (not for sync)."""
    event = on_event or (lambda e: None)
    ref = models.resolve(model)
    if revision:
        ref = replace(ref, revision=revision)
    if ref.renamed_from:
        event({"event": "note", "message": f"{ref.renamed_from} was renamed; using {ref.repo_id}"})
    include, exclude = tuple(include) or ref.include, tuple(exclude)
    repo_dir = models.repo_folder(ref.repo_id, paths.cache_dir())
    if ref.local:
        existed = models.commit_for(ref.repo_id, "main", repo_dir.parent) is not None
        return {**_record_local(ref, models.install_tiny(ref.alias)), "cached": existed}
    chain = mirrors.chain(mirror or ref.endpoint, strict)
    if _offline():
        found = _cached(ref, repo_dir, offline=True)
        if found:
            return found
        raise LoraError(f"HF_HUB_OFFLINE is set, so {ref.name} cannot be downloaded",
                        f"HF_HUB_OFFLINE=0 lora fetch {model}")
    client = Client(timeout, _token(), workers)
    listing, sources, reasons = find_listing(client, ref, chain, event)
    if listing is None:
        found = _cached(ref, repo_dir, stale_check_failed=reasons) if allow_stale else None
        if found:
            event({"event": "note", "message": "no mirror answers; the cached copy is used as it is"})
            return found
        raise LoraError(f"no mirror could list {ref.name} ({ref.repo_id}@{ref.revision})",
                        f"lora mirror test   (or `lora fetch {model} --mirror hf-mirror`)", reasons)
    files = select(listing.files, include, exclude, variant)
    if not files:
        raise LoraError(f"no file of {ref.repo_id}@{listing.commit[:7]} matches the patterns",
                        f"lora fetch {model} --dry-run --include '*'   (to see every file)")
    base = {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision, "commit": listing.commit,
            "mirror": listing.source.name, "size": sum(f.size for f in files), "fallbacks": reasons}
    if dry_run:
        cached = {f.path for f in files if (repo_dir / "blobs" / f.blob).exists()}
        return {**base, "dry_run": True,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "cached": f.path in cached}
                          for f in files],
                "to_download": sum(f.size for f in files if f.path not in cached)}
    fetcher = Fetcher(client, repo_dir, sources, event, workers)
    already = _download(fetcher, ref, listing.commit, files)
    snap = repo_dir / "snapshots" / listing.commit
    tracking.save({
        "alias": ref.alias, "name": ref.name, "repo_id": ref.repo_id, "revision": ref.revision,
        "include": list(include), "exclude": list(exclude), "variant": variant, "mirror": mirror,
        "commit": listing.commit, "size": base["size"], "snapshot": str(snap),
        "files": {f.path: {"size": f.size, "sha256": f.sha256, "oid": f.oid, "blob": f.blob} for f in files},
        "fetched_at": tracking.now_iso(),
    })
    used = next((m.name for m in sources if m.url not in fetcher.down), listing.source.name)
    return {**base, "mirror": used, "snapshot": str(snap), "files": len(files),
            "downloaded": fetcher.transferred, "cached": already and not fetcher.transferred}


def _download(fetcher: Fetcher, ref: models.ModelRef, commit: str, files: list[RemoteFile]) -> bool:
    """Under the model's lock: fetch missing blobs, link the snapshot, move the ref last.
    Returns whether everything was already there."""
    from filelock import Timeout

    repo_dir = fetcher.repo_dir
    lock = model_lock(repo_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        fetcher.event(event="note", message=f"another lora process is fetching {ref.repo_id}; waiting")
        lock.acquire()
    try:
        already = _complete(repo_dir, commit, files)
        todo = {f.blob: f for f in files if not (repo_dir / "blobs" / f.blob).exists()}
        fetcher.event(event="plan", files=len(files), todo=len(todo),
                      todo_bytes=sum(f.size for f in todo.values()),
                      mirror=fetcher.sources[0].name if fetcher.sources else None)
        fetcher.run(files, commit, ref.repo_id)
        for f in files:
            models.link_into_snapshot(repo_dir, commit, f.path, f.blob)
        models.set_ref(repo_dir, ref.revision, commit)
    finally:
        lock.release()
    return already


def _record_local(ref: models.ModelRef, snap: Path) -> dict:
    files = {p.relative_to(snap).as_posix(): {"size": p.stat().st_size, "blob": Path(os.path.realpath(p)).name}
             for p in snap.rglob("*") if p.is_file()}
    total = sum(v["size"] for v in files.values())
    tracking.save({"alias": ref.alias, "name": ref.name, "repo_id": ref.repo_id, "revision": "main",
                   "include": ["*"], "exclude": [], "variant": None, "mirror": None, "local": True,
                   "commit": snap.name, "size": total, "snapshot": str(snap), "files": files,
                   "fetched_at": tracking.now_iso()})
    return {"model": ref.name, "repo_id": ref.repo_id, "revision": "main", "commit": snap.name,
            "snapshot": str(snap), "size": total, "files": len(files), "downloaded": 0,
            "cached": True, "mirror": "local build"}


def probe(mirror: Mirror, model: str = "sd15", file: str = "model_index.json",
          timeout: float = 10.0) -> dict:
    """Is a mirror reachable, how fast does it answer, does it serve a small known file?"""
    client = Client(timeout, _token(), 1)
    ref = models.resolve(model)
    row = {"name": mirror.name, "url": mirror.url, "kind": mirror.kind, "reachable": False,
           "latency_ms": None, "serves_file": False, "error": "", "retired": mirror.retired}
    start = time.monotonic()
    try:
        kind = client.kind(mirror)
        row["kind"] = kind
        if kind == "hub":
            info, _ = client.get_json(mirror, f"{mirror.url}/api/models/{ref.repo_id}/revision/main")
            row["latency_ms"] = round((time.monotonic() - start) * 1000, 1)
            row["reachable"] = True
            url = file_url(client, mirror, ref.repo_id, str(info.get("sha", "main")), file)
        else:
            url = file_url(client, mirror, ref.repo_id, "", file)
        r = client.request(mirror, url)
        if row["latency_ms"] is None:
            row["latency_ms"] = round((time.monotonic() - start) * 1000, 1)
        row["reachable"] = True
        _check_status(r, url)
        row["serves_file"] = bool(r.data)
    except MirrorError as e:
        row["error"] = str(e)
        if row["latency_ms"] is None and ("HTTP" in str(e)):
            row["reachable"] = True
            row["latency_ms"] = round((time.monotonic() - start) * 1000, 1)
    return row
