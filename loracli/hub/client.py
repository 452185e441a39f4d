"""`lora fetch`: list a model on a mirror, pick its files, download them into the cache.

Why not `huggingface_hub.snapshot_download` alone (see reference/hub.md): it does not resume a
download killed in an earlier run, it checks sizes only, it reads `HF_ENDPOINT`/`HF_HUB_OFFLINE`
once at import, and its Xet path fetches bytes around a mirror. So here:
- the commit sha is pinned first and the file list with sha256 comes from the recursive tree (or a
  files-kind mirror's manifest), every name in them checked (`listing`, `hubcache`);
- `download` moves the bytes: resumable, verified before a blob enters the cache, parallel; the
  snapshot links and `refs/<revision>` come last, under the model's lock;
- mirrors are tried in the user's order (`mirrors.chain`), or, when nothing was ever chosen, all at
  once with the fastest kept (`health.fastest`); a mirror that fails or stalls is left for the rest
  of the fetch (`transport.Client.down`); the endpoint is passed per request.
The result is the Hugging Face cache layout, so `from_pretrained(..., local_files_only=True)`,
`hf_hub_download` offline and open_clip read it. This module, `listing`, `health`, `transport`,
`connections` and `download` are the only network code. Anything a server said is redacted of
the token.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from loracli import paths
from loracli.errors import LoraError
from loracli.hub import health, hubcache, listing, mirrors, models, tracking
from loracli.hub.download import RETRIES, Events, Fetcher, RemoteFile  # noqa: F401 (hub.RemoteFile)
from loracli.hub.listing import select  # noqa: F401 (hub.select)
from loracli.hub.mirrors import Mirror
from loracli.hub.transport import Client, redact, redact_all, token


def _complete(repo_dir: Path, commit: str, files: list[RemoteFile]) -> bool:
    snap = repo_dir / "snapshots" / commit
    return all((snap / f.path).exists() and (repo_dir / "blobs" / f.blob).exists() for f in files)


def _cached(ref: models.ModelRef, repo_dir: Path, **extra) -> dict | None:
    """The result for a model already in the cache at its revision, or None."""
    commit = hubcache.commit_for(ref.repo_id, ref.revision, repo_dir.parent)
    snap = repo_dir / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir():
        return None
    files = [{"path": p.relative_to(snap).as_posix(), "size": p.stat().st_size}
             for p in sorted(snap.rglob("*")) if p.is_file()]
    return {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision, "commit": commit,
            "snapshot": str(snap), "files": files, "size": sum(f["size"] for f in files),
            "cached": True, "downloaded": 0, **extra}


def _chain(client: Client, ref: models.ModelRef, chosen: str | None, strict: bool,
           event: Events) -> list[Mirror]:
    """The mirrors to ask, in order; with nothing chosen ever, the fastest of a race, remembered."""
    if not mirrors.needs_probe(chosen):
        chain = mirrors.chain(chosen, strict)
        if not chain:
            raise LoraError("no mirror to fetch from: the mirror order is empty",
                            "lora mirror use hf-mirror hf")
        return chain
    order, seen = health.fastest(client, ref, mirrors.candidates())
    good = [(m, ms) for m, ok, ms, _ in seen if ok]
    if good:
        mirrors.remember([m.name for m in order])
        event({"event": "note", "message": f"no mirror chosen yet: asked {len(order)} at once; "
               f"{good[0][0].name} answered first ({good[0][1]:.0f} ms) and is used from now on "
               f"(order: {', '.join(m.name for m in order)}; change it with `lora mirror use`)"})
    return order[:1] if strict else order


def _hint(model: str, chain: list[Mirror], client: Client) -> str:
    untried = [m for m in mirrors.candidates() if m not in chain and m.url not in client.down]
    if untried:
        return f"lora fetch {model} --mirror {untried[0].name}   (or `lora mirror test` to see which answer)"
    return "lora mirror test   (then `lora mirror add NAME URL` for a mirror that answers on your network)"


def fetch(model: str, *, mirror: str | None = None, revision: str | None = None,
          include=(), exclude=(), variant: str | None = None, strict: bool = False,
          dry_run: bool = False, workers: int = 4, timeout: float | None = None,
          on_event: Events | None = None, allow_stale: bool = True) -> dict:
    """Fetch `model` into the cache (verified, resumable); returns what was done.

    `allow_stale`: when no mirror answers, a cached copy counts as success (not for sync)."""
    secret = token()
    sink = on_event or (lambda e: None)
    try:
        result = _fetch(model, mirror, revision, tuple(include), tuple(exclude), variant, strict,
                        dry_run, workers, timeout, lambda e: sink(redact_all(e, secret)), allow_stale,
                        secret)
    except LoraError as e:
        e.message, e.hint = redact(e.message, secret), e.hint and redact(e.hint, secret)
        e.details = [redact(d, secret) for d in e.details]
        raise
    return redact_all(result, secret)


def _fetch(model, mirror, revision, include, exclude, variant, strict, dry_run, workers, timeout,
           event, allow_stale, secret) -> dict:
    ref = models.resolve(model)
    if revision:
        ref = replace(ref, revision=models.check_revision(revision, model))
    if ref.renamed_from:
        event({"event": "note", "message": f"{ref.renamed_from} was renamed; using {ref.repo_id}"})
    include = include or ref.include
    repo_dir = hubcache.repo_folder(ref.repo_id, paths.cache_dir())
    if ref.local:
        existed = hubcache.commit_for(ref.repo_id, "main", repo_dir.parent) is not None
        return {**_record_local(ref, models.install_tiny(ref.alias)), "cached": existed}
    if mirror or ref.endpoint:
        mirrors.get(mirror or ref.endpoint)  # an unknown name is an error even offline
    if mirrors.offline():
        found = _cached(ref, repo_dir, offline=True)
        if found:
            return found
        raise LoraError(f"HF_HUB_OFFLINE is set, so {ref.name} cannot be downloaded",
                        f"HF_HUB_OFFLINE=0 lora fetch {model}")
    client = Client(timeout, secret, workers)
    chain = _chain(client, ref, mirror or ref.endpoint, strict, event)
    found, sources, reasons = listing.find(client, ref, chain, event)
    if found is None:
        stale = _cached(ref, repo_dir, stale_check_failed=reasons) if allow_stale else None
        if stale:
            event({"event": "note", "message": "no mirror answers; the cached copy is used as it is"})
            return stale
        raise LoraError(f"no mirror could list {ref.name} ({ref.repo_id}@{ref.revision})",
                        _hint(model, chain, client), reasons)
    files = select(found.files, include, exclude, variant)
    if not files:
        raise LoraError(f"no file of {ref.repo_id}@{found.commit[:7]} matches the patterns",
                        f"lora fetch {model} --dry-run --include '*'   (to see every file)")
    base = {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision, "commit": found.commit,
            "mirror": found.source.name, "size": sum(f.size for f in files), "fallbacks": reasons}
    have = {f.path for f in files if hubcache.blob_path(repo_dir, f.blob).exists()}
    rows = [{"path": f.path, "size": f.size, "sha256": f.sha256, "cached": f.path in have} for f in files]
    if dry_run:
        return {**base, "dry_run": True, "files": rows,
                "to_download": sum(f.size for f in files if f.path not in have)}
    fetcher = Fetcher(client, repo_dir, sources, event, workers)
    already = _download(fetcher, ref, found.commit, files)
    snap = repo_dir / "snapshots" / found.commit
    tracking.save({
        "alias": ref.alias, "name": ref.name, "repo_id": ref.repo_id, "revision": ref.revision,
        "include": list(include), "exclude": list(exclude), "variant": variant, "mirror": mirror,
        "commit": found.commit, "size": base["size"], "snapshot": str(snap),
        "files": {f.path: {"size": f.size, "sha256": f.sha256, "oid": f.oid, "blob": f.blob} for f in files},
        "fetched_at": tracking.now_iso(),
    })
    used = next((m.name for m in sources if m.url not in client.down), found.source.name)
    return {**base, "mirror": used, "snapshot": str(snap), "files": rows,
            "downloaded": fetcher.transferred, "cached": already and not fetcher.transferred}


def _download(fetcher: Fetcher, ref: models.ModelRef, commit: str, files: list[RemoteFile]) -> bool:
    """Under the model's lock: fetch missing blobs, link the snapshot, move the ref last.
    Returns whether everything was already there."""
    from filelock import Timeout

    repo_dir = fetcher.repo_dir
    lock = hubcache.model_lock(repo_dir)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        fetcher.event(event="note", message=f"another lora process is fetching {ref.repo_id}; waiting")
        lock.acquire()
    try:
        already = _complete(repo_dir, commit, files)
        todo = {f.blob: f for f in files if not hubcache.blob_path(repo_dir, f.blob).exists()}
        fetcher.event(event="plan", files=len(files), todo=len(todo),
                      todo_bytes=sum(f.size for f in todo.values()),
                      mirror=fetcher.sources[0].name if fetcher.sources else None)
        fetcher.run(files, commit, ref.repo_id)
        try:
            for f in files:
                hubcache.link_into_snapshot(repo_dir, commit, f.path, f.blob)
            hubcache.set_ref(repo_dir, ref.revision, commit)
        except OSError as e:
            raise LoraError(f"could not write the snapshot of {ref.name} in {repo_dir}: {e.strerror or e}",
                            f"lora cache rm {ref.name} --yes   (then fetch it again)") from None
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
            "snapshot": str(snap), "size": total, "downloaded": 0, "cached": True, "mirror": "local build",
            "files": [{"path": k, "size": v["size"], "sha256": v["blob"] if len(v["blob"]) == 64 else None,
                       "cached": True} for k, v in sorted(files.items())]}
