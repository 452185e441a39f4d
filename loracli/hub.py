"""The only network code: list a model on a mirror, download its files into the cache, verified.

Why not `huggingface_hub.snapshot_download` alone (see reference/hub.md): it does not resume a
download killed in an earlier run, it checks sizes only, it reads `HF_ENDPOINT`/`HF_HUB_OFFLINE`
once at import, and its Xet path fetches bytes around a mirror. So here:
- the commit sha is pinned first (`/api/models/{repo}/revision/{rev}`), the file list with
  sha256 comes from the recursive tree (or a files-kind mirror's manifest);
- each file is written to `blobs/<sha256 or git oid>.incomplete`, resumed with `Range` from
  whatever an earlier run left, hashed while it streams, and renamed into `blobs/` only when its
  digest matches what the mirror published; the snapshot links and `refs/<revision>` come last;
- files download in parallel (a thread pool); a per-model file lock makes two processes end with
  one correct copy; mirrors are tried in order (chosen, then fallbacks), each switch reported;
- the endpoint is passed per request, `HF_TOKEN` goes only to hub-kind mirrors and is never
  printed.
The result is the Hugging Face cache layout, so `from_pretrained(..., local_files_only=True)`,
`hf_hub_download` offline and open_clip read it.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from loracli import __version__, atomic, mirrors, models, paths, tracking
from loracli.errors import LoraError
from loracli.mirrors import Mirror

CHUNK = 1 << 20
RETRIES = 3
DEFAULT_TIMEOUT = 30.0
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".onnx", ".msgpack", ".h5")


class MirrorError(Exception):
    """One mirror failed one request. `permanent`: retrying the same mirror will not help."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class RemoteFile:
    path: str
    size: int
    sha256: str | None = None  # what LFS publishes (and what a manifest lists)
    oid: str | None = None  # the git blob sha1 (what the hub publishes for small files)

    @property
    def blob(self) -> str:
        """The blob's name in the cache: sha256 for LFS files, the git oid otherwise (as HF does)."""
        return self.sha256 or self.oid or ""


@dataclass
class Listing:
    repo_id: str
    revision: str
    commit: str
    files: list[RemoteFile]
    source: Mirror


Events = Callable[[dict], None]


def _token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def timeout_default() -> float:
    try:
        return float(os.environ.get("LORA_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


class Client:
    """HTTP to mirrors: one connection pool, per-request endpoint, the token only to hub mirrors."""

    def __init__(self, timeout: float | None = None, token: str | None = None, workers: int = 4):
        import urllib3

        self.timeout = timeout or timeout_default()
        self.token = token
        self._urllib3 = urllib3
        self.pool = urllib3.PoolManager(
            num_pools=8, maxsize=max(4, workers),
            retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
            timeout=urllib3.Timeout(connect=min(self.timeout, 10.0), read=self.timeout),
        )
        self._kinds: dict[str, str] = {}

    def headers(self, mirror: Mirror, extra: dict | None = None) -> dict:
        h = {"User-Agent": f"lora/{__version__}", "Accept-Encoding": "identity"}
        if self.token and self.kind(mirror) == "hub":
            h["Authorization"] = f"Bearer {self.token}"
        h.update(extra or {})
        return h

    def request(self, mirror: Mirror, url: str, headers: dict | None = None, stream: bool = False):
        try:
            return self.pool.request("GET", url, headers=self.headers(mirror, headers),
                                     preload_content=not stream, decode_content=False)
        except self._urllib3.exceptions.HTTPError as e:
            raise MirrorError(_describe(e, self.timeout)) from None

    def get_json(self, mirror: Mirror, url: str):
        r = self.request(mirror, url)
        _check_status(r, url)
        try:
            return r.json(), r.headers
        except ValueError:
            raise MirrorError(f"{url}: not JSON (is this a {mirror.kind} mirror?)", True) from None

    def kind(self, mirror: Mirror) -> str:
        """hub or files; a bare URL is files-kind when it serves `lora-mirror.json`."""
        if mirror.kind != "auto":
            return mirror.kind
        if mirror.url not in self._kinds:
            self._kinds[mirror.url] = "hub"  # while probing: no token for an unknown server
            kind = "hub"
            try:
                r = self.pool.request("GET", mirror.url + "/lora-mirror.json",
                                      headers={"User-Agent": f"lora/{__version__}"})
                if r.status == 200 and r.json().get("kind") == "files":
                    kind = "files"
            except (self._urllib3.exceptions.HTTPError, ValueError, AttributeError):
                pass
            self._kinds[mirror.url] = kind
        return self._kinds[mirror.url]


def _describe(e: Exception, timeout: float) -> str:
    name = type(e).__name__
    text = str(e)
    if "timed out" in text.lower() or "Timeout" in name:
        return f"timed out after {timeout:g} s"
    if "NewConnectionError" in text or "Connection refused" in text:
        return "connection refused"
    if "IncompleteRead" in text or "Connection broken" in text or "ProtocolError" in name:
        return "connection dropped mid-transfer"
    return f"{name}: {text.split(': ', 1)[-1][:160]}"


def _check_status(r, url: str) -> None:
    if r.status < 300:
        return
    code = r.headers.get("X-Error-Code", "")
    if r.status in (401, 403):
        raise MirrorError(f"HTTP {r.status} {code or 'unauthorized'} (gated or private? set HF_TOKEN)", True)
    if r.status == 404:
        raise MirrorError(f"HTTP 404 {code or 'not found'}", True)
    if r.status == 416:
        raise MirrorError("HTTP 416: stale partial file, starting it over")
    raise MirrorError(f"HTTP {r.status}{' ' + code if code else ''}", r.status < 500 and r.status != 429)


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


def file_url(client: Client, mirror: Mirror, repo_id: str, commit: str, path: str) -> str:
    if client.kind(mirror) == "files":
        return f"{mirror.url}/{repo_id}/{quote(path, safe='/')}"
    return f"{mirror.url}/{repo_id}/resolve/{commit}/{quote(path, safe='/')}"


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


# --- downloading -----------------------------------------------------------------------------

class Fetcher:
    """Downloads a listing's files into one repo folder of the cache, from an ordered source list."""

    def __init__(self, client: Client, repo_dir: Path, sources: list[Mirror], on_event: Events,
                 workers: int = 4):
        self.client = client
        self.repo_dir = repo_dir
        self.sources = sources
        self.down: dict[str, str] = {}
        self.on_event = on_event
        self.workers = workers
        self.transferred = 0
        self._lock = threading.Lock()

    def event(self, **e) -> None:
        with self._lock:
            self.on_event(e)

    def blob_path(self, f: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / f.blob

    def run(self, files: list[RemoteFile], commit: str, repo_id: str) -> None:
        (self.repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        todo = [f for f in files if not self.blob_path(f).exists()]
        todo.sort(key=lambda f: -f.size)
        errors: list[LoraError] = []
        if todo:
            with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lora-fetch") as pool:
                futures = [pool.submit(self.download, f, commit, repo_id) for f in todo]
                for fut in futures:
                    try:
                        fut.result()
                    except LoraError as e:
                        errors.append(e)
        if errors:
            raise errors[0]

    def download(self, f: RemoteFile, commit: str, repo_id: str) -> None:
        reasons = []
        for mirror in self.sources:
            if mirror.url in self.down:
                continue
            try:
                self._download_from(mirror, f, commit, repo_id)
                self.event(event="file_done", path=f.path, mirror=mirror.name)
                return
            except MirrorError as e:
                reasons.append(f"{mirror.name}: {e}")
                if not e.permanent:
                    with self._lock:
                        self.down.setdefault(mirror.url, str(e))
                self.event(event="fallback", mirror=mirror.name, path=f.path, reason=str(e))
        raise LoraError(f"could not download {f.path} from any mirror", details=reasons,
                        hint="lora mirror test   (then `lora fetch … --mirror NAME` with one that answers)")

    def _download_from(self, mirror: Mirror, f: RemoteFile, commit: str, repo_id: str) -> None:
        blob = self.blob_path(f)
        part = blob.with_name(blob.name + ".incomplete")
        url = file_url(self.client, mirror, repo_id, commit, f.path)
        attempts, restarted = 0, False
        hashers, hashed = None, -1
        while True:
            if blob.exists():  # another thread of this process fetched the same content
                return
            offset = part.stat().st_size if part.exists() else 0
            if offset > f.size:
                part.unlink()
                offset = 0
            if hashed != offset:
                hashers = _hashers(f)
                hashed = _hash_prefix(part, hashers, offset)
            try:
                if offset < f.size or not part.exists():
                    hashed = self._get_into(mirror, url, part, offset, f, hashers)
                if hashed != f.size:
                    raise MirrorError(f"got {hashed} of {f.size} bytes")
            except MirrorError as e:
                if part.exists() and "416" in str(e):
                    part.unlink()
                if e.permanent:
                    raise
                attempts += 1
                if attempts >= RETRIES:
                    raise
                self.event(event="retry", mirror=mirror.name, path=f.path, reason=str(e), attempt=attempts)
                hashed = -1
                time.sleep(min(0.2 * 2 ** attempts, 2.0))
                continue
            problem = _mismatch(f, hashers)
            if problem:
                part.unlink(missing_ok=True)
                if offset > 0 and not restarted:  # the earlier run's partial may be the bad part
                    restarted, hashed = True, -1
                    continue
                raise MirrorError(f"{problem} for {f.path}; rejected, nothing kept", True)
            os.replace(part, blob)
            atomic.fsync_dir(blob.parent)
            return

    def _get_into(self, mirror, url, part: Path, offset: int, f: RemoteFile, hashers) -> int:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        r = self.client.request(mirror, url, headers, stream=True)
        try:
            _check_status(r, url)
            if offset and r.status == 200:  # the server ignored Range (olah does): start over
                offset = 0
                for h in hashers:
                    h.reset()
            elif offset and not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise MirrorError(f"bad Content-Range {r.headers.get('Content-Range')!r}", True)
            done = offset
            with open(part, "ab" if offset else "wb") as out:
                for chunk in r.stream(CHUNK):
                    out.write(chunk)
                    for h in hashers:
                        h.update(chunk)
                    done += len(chunk)
                    with self._lock:
                        self.transferred += len(chunk)
                        self.on_event({"event": "progress", "path": f.path, "bytes": len(chunk)})
                    if done > f.size:
                        raise MirrorError(f"served more than the listed {f.size} bytes", True)
                out.flush()
                os.fsync(out.fileno())
            return done
        except self.client._urllib3.exceptions.HTTPError as e:
            raise MirrorError(_describe(e, self.client.timeout)) from None
        finally:
            r.release_conn()


class _Hasher:
    def __init__(self, name: str, make):
        self.name, self._make = name, make
        self.h = make()

    def update(self, data: bytes) -> None:
        self.h.update(data)

    def reset(self) -> None:
        self.h = self._make()

    def hexdigest(self) -> str:
        return self.h.hexdigest()


def _hashers(f: RemoteFile) -> list[_Hasher]:
    hs = []
    if f.sha256:
        hs.append(_Hasher("sha256", hashlib.sha256))
    if f.oid and not f.sha256:
        prefix = b"blob %d\0" % f.size
        hs.append(_Hasher("git-sha1", lambda: hashlib.sha1(prefix)))
    return hs


def _hash_prefix(part: Path, hashers, offset: int) -> int:
    if not offset:
        return 0
    done = 0
    with open(part, "rb") as fh:
        while done < offset:
            chunk = fh.read(min(CHUNK * 8, offset - done))
            if not chunk:
                break
            for h in hashers:
                h.update(chunk)
            done += len(chunk)
    return done


def _mismatch(f: RemoteFile, hashers) -> str | None:
    for h in hashers:
        want = f.sha256 if h.name == "sha256" else f.oid
        if h.hexdigest() != want:
            return f"{h.name} mismatch (want {want[:12]}…, got {h.hexdigest()[:12]}…)"
    return None


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


def fetch(model: str, *, mirror: str | None = None, revision: str | None = None,
          include=(), exclude=(), variant: str | None = None, strict: bool = False,
          dry_run: bool = False, workers: int = 4, timeout: float | None = None,
          on_event: Events | None = None, allow_stale: bool = True) -> dict:
    """Fetch `model` into the cache (verified, resumable); returns what was done."""
    event = on_event or (lambda e: None)
    ref = models.resolve(model)
    if revision:
        ref = replace(ref, revision=revision)
    if ref.renamed_from:
        event({"event": "note", "message": f"{ref.renamed_from} was renamed; using {ref.repo_id}"})
    include = tuple(include) or ref.include
    exclude = tuple(exclude)
    cache = paths.cache_dir()
    repo_dir = models.repo_folder(ref.repo_id, cache)
    if ref.local:
        snap = models.install_tiny(ref.alias)
        return _record_local(ref, snap)
    chain = mirrors.chain(mirror or ref.endpoint, strict)
    if _offline():
        commit = models.commit_for(ref.repo_id, ref.revision, cache)
        if commit and (repo_dir / "snapshots" / commit).is_dir():
            return {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision,
                    "commit": commit, "snapshot": str(repo_dir / "snapshots" / commit),
                    "cached": True, "downloaded": 0, "offline": True}
        raise LoraError(f"HF_HUB_OFFLINE is set, so {ref.name} cannot be downloaded",
                        f"HF_HUB_OFFLINE=0 lora fetch {model}")
    client = Client(timeout, _token(), workers)
    listing, sources, reasons = find_listing(client, ref, chain, event)
    if listing is None:
        commit = models.commit_for(ref.repo_id, ref.revision, cache)
        hint = f"lora mirror test   (or `lora fetch {model} --mirror hf-mirror`)"
        if allow_stale and commit and (repo_dir / "snapshots" / commit).is_dir():
            event({"event": "note", "message": "no mirror answers; the cached copy is used as it is"})
            return {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision, "commit": commit,
                    "snapshot": str(repo_dir / "snapshots" / commit), "cached": True, "downloaded": 0,
                    "stale_check_failed": reasons}
        raise LoraError(f"no mirror could list {ref.name} ({ref.repo_id}@{ref.revision})",
                        hint=hint, details=reasons)
    files = select(listing.files, include, exclude, variant)
    if not files:
        raise LoraError(f"no file of {ref.repo_id}@{listing.commit[:7]} matches the patterns",
                        f"lora fetch {model} --dry-run --include '*'   (to see every file)")
    total = sum(f.size for f in files)
    cached = {f.path for f in files if (repo_dir / "blobs" / f.blob).exists()}
    base = {"model": ref.name, "repo_id": ref.repo_id, "revision": ref.revision, "commit": listing.commit,
            "mirror": listing.source.name, "size": total, "fallbacks": reasons}
    if dry_run:
        return {**base, "dry_run": True,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "cached": f.path in cached}
                          for f in files],
                "to_download": sum(f.size for f in files if f.path not in cached)}
    lock = model_lock(repo_dir)
    from filelock import Timeout

    try:
        lock.acquire(timeout=0)
    except Timeout:
        event({"event": "note", "message": f"another lora process is fetching {ref.repo_id}; waiting"})
        lock.acquire()
    try:
        already = _complete(repo_dir, listing.commit, files)
        fetcher = Fetcher(client, repo_dir, sources, event, workers)
        todo = [f for f in files if not (repo_dir / "blobs" / f.blob).exists()]
        event({"event": "plan", "files": len(files), "todo": len(todo), "size": total,
               "todo_bytes": sum(f.size for f in todo), "mirror": sources[0].name if sources else None})
        fetcher.run(files, listing.commit, ref.repo_id)
        for f in files:
            models.link_into_snapshot(repo_dir, listing.commit, f.path, f.blob)
        models.set_ref(repo_dir, ref.revision, listing.commit)
    finally:
        lock.release()
    snap = repo_dir / "snapshots" / listing.commit
    used = next((m.name for m in sources if m.url not in fetcher.down), listing.source.name)
    tracking.save({
        "alias": ref.alias, "name": ref.name, "repo_id": ref.repo_id, "revision": ref.revision,
        "include": list(include), "exclude": list(exclude), "variant": variant, "mirror": mirror,
        "commit": listing.commit, "size": total, "snapshot": str(snap),
        "files": {f.path: {"size": f.size, "sha256": f.sha256, "oid": f.oid, "blob": f.blob} for f in files},
        "fetched_at": tracking.now_iso(),
    })
    return {**base, "mirror": used, "snapshot": str(snap), "files": len(files),
            "downloaded": fetcher.transferred, "cached": already and not fetcher.transferred}


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
