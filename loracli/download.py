"""Moving bytes from a mirror into the cache: HTTP, resume, verification, parallel files.

Each file is written to `blobs/<sha256 or git oid>.incomplete`, resumed with `Range` from whatever
an earlier run left there (a 200 to a ranged request starts over; a 416 drops the stale partial),
hashed while it streams, and renamed into `blobs/` only when its digest matches what the mirror
published. Transient failures (drops, 5xx, time-outs) are retried on the same mirror, then the
next source is tried; a wrong digest or a 404 moves on at once. `HF_TOKEN` goes only to hub-kind
mirrors, never into a message.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import quote

from loracli import __version__, atomic
from loracli.errors import LoraError
from loracli.mirrors import Mirror

CHUNK = 1 << 20
RETRIES = 3
DEFAULT_TIMEOUT = 30.0

Events = Callable[[dict], None]

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
            kind = "hub"
            try:  # no token: we do not know yet what this server is
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


def file_url(client: Client, mirror: Mirror, repo_id: str, commit: str, path: str) -> str:
    if client.kind(mirror) == "files":
        return f"{mirror.url}/{repo_id}/{quote(path, safe='/')}"
    return f"{mirror.url}/{repo_id}/resolve/{commit}/{quote(path, safe='/')}"


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
        self._cancel = threading.Event()

    def event(self, **e) -> None:
        with self._lock:
            self.on_event(e)

    def blob_path(self, f: RemoteFile) -> Path:
        return self.repo_dir / "blobs" / f.blob

    def run(self, files: list[RemoteFile], commit: str, repo_id: str) -> None:
        (self.repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        # one download per blob: identical files (SDXL's two tokenizers) share one
        todo = list({f.blob: f for f in files if not self.blob_path(f).exists()}.values())
        todo.sort(key=lambda f: -f.size)
        errors: list[LoraError] = []
        if not todo:
            return
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="lora-fetch")
        try:
            futures = [pool.submit(self.download, f, commit, repo_id) for f in todo]
            for fut in futures:
                try:
                    fut.result()
                except LoraError as e:
                    errors.append(e)
        except BaseException:  # Ctrl-C: stop the workers at their next chunk; partials stay
            self._cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
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
                    if self._cancel.is_set():
                        raise KeyboardInterrupt
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
