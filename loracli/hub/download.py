"""Moving bytes from a mirror into the cache: resume, verification, parallel files.

Each file is written to `blobs/<sha256 or git oid>.incomplete` (the digest checked, the path
resolved inside the cache: `hubcache.blob_path`), resumed with `Range` from whatever an earlier
run left there (a 200 to a ranged request starts over; a 416 drops the stale partial), hashed
while it streams, and renamed into `blobs/` only when its digest is the blob's name. Drops and
5xx are retried on the same mirror; a stall, a refused connection or a DNS failure leaves that
mirror for the rest of the fetch at once (`transport.Client.down`); a wrong digest or a 404 moves
on to the next mirror.
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

from loracli import atomic
from loracli.errors import LoraError
from loracli.hub import hubcache
from loracli.hub.mirrors import Mirror
from loracli.hub.transport import CHUNK, DOWN_STATES, Client, MirrorError, file_url

RETRIES = 3

Events = Callable[[dict], None]


@dataclass(frozen=True)
class RemoteFile:
    """One file of a listing; its path and digests were checked (`hubcache`) when it was listed."""

    path: str
    size: int
    sha256: str | None = None  # what LFS publishes (and what a manifest lists)
    oid: str | None = None  # the git blob sha1 (what the hub publishes for small files)

    @property
    def blob(self) -> str:
        """The blob's name in the cache: sha256 for LFS files, the git oid otherwise (as HF does)."""
        return self.sha256 or self.oid or ""


# --- downloading -----------------------------------------------------------------------------

class Fetcher:
    """Downloads a listing's files into one repo folder of the cache, from an ordered source list."""

    def __init__(self, client: Client, repo_dir: Path, sources: list[Mirror], on_event: Events,
                 workers: int = 4):
        self.client = client
        self.repo_dir = repo_dir
        self.sources = sources
        self.on_event = on_event
        self.workers = workers
        self.transferred = 0
        self._lock = threading.Lock()
        self._cancel = threading.Event()

    def event(self, **e) -> None:
        with self._lock:
            self.on_event(e)

    def blob_path(self, f: RemoteFile) -> Path:
        return hubcache.blob_path(self.repo_dir, f.blob)

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
            if mirror.url in self.client.down:
                reasons.append(f"{mirror.name}: {self.client.down[mirror.url]}")
                continue
            try:
                self._download_from(mirror, f, commit, repo_id)
                self.event(event="file_done", path=f.path, mirror=mirror.name)
                return
            except OSError as e:
                raise LoraError(f"could not write {f.path} into {self.repo_dir / 'blobs'}: "
                                f"{e.strerror or e}", "free some disk space (or set LORA_CACHE to "
                                "another disk), then run the same `lora fetch` again") from None
            except MirrorError as e:
                reasons.append(f"{mirror.name}: {e}")
                if not e.permanent:  # retried and still failing, or stalled: leave it
                    self.client.mark_down(mirror, MirrorError(str(e), state="given-up"))
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
                if e.permanent or e.state in DOWN_STATES or mirror.url in self.client.down:
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
            self.client.check_status(r, url)
            if offset and r.status == 200:  # the server ignored Range (olah does): start over
                offset = 0
                for h in hashers:
                    h.reset()
            elif offset and not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                raise MirrorError(f"bad Content-Range "
                                  f"{self.client.clean(r.headers.get('Content-Range'), 60)!r}", True)
            done = offset
            with open(part, "ab" if offset else "wb") as out:
                for chunk in self.client.chunks(mirror, r, url, f.size - offset):
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
        except BaseException:
            self.client.discard(r)  # never hand a half-read connection back to the pool
            raise
        r.release_conn()
        return done


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
