"""A Hugging Face hub-compatible HTTP server on 127.0.0.1, for tests and benchmarks.

    from hubserver import serve, Fault     # tests/ is on sys.path under pytest

    with serve({"org/tiny": tiny_folder}) as url:          # url is a str: "http://127.0.0.1:PORT"
        fetch("org/tiny", mirror=url)
        url.bytes_sent("unet/*")                            # body bytes served for matching files
        url.log                                             # one dict per request

It serves, from plain folders read at request time (edit a file and the commit changes):
- `GET /api/models/{repo}/revision/{rev}`      → {"id", "sha", "siblings": [{"rfilename"}]}
- `GET /api/models/{repo}/tree/{rev}?recursive=true` → [{type, oid, size, path, lfs?}]
- `HEAD|GET /{repo}/resolve/{rev}/{path}`      → bytes with X-Repo-Commit, ETag/X-Linked-Etag,
  `Range: bytes=N-` answered 206 + Content-Range (416 past the end)
- 404 with `X-Error-Code: RepoNotFound | RevisionNotFound | EntryNotFound`; with `token=` set,
  401 (`GatedRepo`) unless `Authorization: Bearer <token>` is sent.
`layout="files"` serves the files-kind layout instead: `/{repo}/{path}` plain files, plus
`/{repo}/lora-manifest.json` and `/lora-mirror.json` when `manifest=True` (TUNA had neither).
`serve_dir(folder)` serves any folder statically (e.g. a `lora mirror sync --publish` tree).

Faults (`faults=[Fault(...)]`) apply to file bodies whose repo path matches `path` (a glob), for
the first `times` matching requests (0: always):
- `drop`: close the connection after `after` body bytes;   - `status`: answer `status` (500…);
- `corrupt`: flip a byte of the body (the sha256 no longer matches);
- `stall`: send `after` bytes, then go silent for `seconds`; - `escape`: list an extra file
  `../../escape.txt` in the tree (a path that leaves the repository folder);
- `trickle`: send one byte every `seconds`, for at most `after` seconds, then hang up.
Hostile hubs (tests of what a mirror must never make lora do):
- `commit`: answer `value` as the commit sha (and serve the tree and files for any path);
- `oid`: list `value` as the LFS oid (or git oid) of the files matching `path`;
- `name`: list an extra file named `value`;
- `echo`: answer API and file requests with `status`, echoing the Authorization header in
  `X-Error-Code`, `X-Error-Message` and the body;
- `link`: send the file list's next page as `value` (a URL, perhaps on another server).
`api_delay` (seconds) makes every API answer late (a slow mirror).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from hubfaults import HostileHub

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".msgpack", ".h5")
CHUNK = 1 << 16


@dataclass
class Fault:
    kind: str  # drop | status | corrupt | stall | escape | trickle | commit | oid | name | echo | link | pages
    path: str = "*"
    value: str = ""
    times: int = 1
    after: int = 0
    status: int = 500
    seconds: float = 30.0
    used: int = 0

    def take(self, path: str) -> bool:
        if not fnmatch.fnmatchcase(path, self.path):
            return False
        if self.times and self.used >= self.times:
            return False
        self.used += 1
        return True


class Hub(str):
    """The base URL, carrying the request log of the server behind it."""

    log: list
    faults: list

    def bytes_sent(self, pattern: str = "*") -> int:
        return sum(r["sent"] for r in list(self.log)
                   if r.get("file") is not None and fnmatch.fnmatchcase(r["file"], pattern))

    def requests(self, pattern: str = "*", method: str | None = None) -> list:
        return [r for r in list(self.log) if r.get("file") is not None
                and fnmatch.fnmatchcase(r["file"], pattern) and (method is None or r["method"] == method)]


_digest_cache: dict = {}
_digest_lock = threading.Lock()


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, cached by (path, size, mtime)."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _digest_lock:
        if key in _digest_cache:
            return _digest_cache[key]
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % st.st_size)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha256.update(chunk)
            sha1.update(chunk)
    value = (sha256.hexdigest(), sha1.hexdigest())
    with _digest_lock:
        _digest_cache[key] = value
    return value


def repo_listing(folder: Path) -> tuple[str, list[dict]]:
    """(commit, tree entries) of a folder, as the hub would list it."""
    folder = Path(folder)
    entries, dirs = [], set()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or any(part.startswith(".") for part in rel.split("/")):
            continue
        parent = rel.rpartition("/")[0]
        while parent and parent not in dirs:
            dirs.add(parent)
            parent = parent.rpartition("/")[0]
        sha256, sha1 = _digests(p)
        size = p.stat().st_size
        entry = {"type": "file", "oid": sha1, "size": size, "path": rel}
        if rel.endswith(LFS_SUFFIXES) or size > 10_000_000:
            entry["lfs"] = {"oid": sha256, "size": size, "pointerSize": 134}
        entries.append(entry)
    commit = hashlib.sha1(json.dumps([(e["path"], e["oid"]) for e in entries]).encode()).hexdigest()
    dir_entries = [{"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0,
                    "path": d} for d in sorted(dirs)]
    return commit, dir_entries + entries


def manifest(repo_id: str, folder: Path) -> dict:
    """The files-kind manifest `lora mirror sync --publish` writes, computed from a folder."""
    commit, entries = repo_listing(folder)
    files = [{"path": e["path"], "size": e["size"],
              "sha256": _digests(Path(folder) / e["path"])[0], "oid": e["oid"]}
             for e in entries if e["type"] == "file"]
    return {"repo_id": repo_id, "revision": "main", "commit": commit, "files": files}


class _Handler(HostileHub, BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # quiet
        pass

    def do_HEAD(self):
        self._route(head=True)

    def do_GET(self):
        self._route(head=False)

    # -- plumbing --
    def _send_json(self, obj, status=200, headers=None):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self._record(status=status, sent=0)

    def _error(self, status, code, message="error", file=None):
        self._send_json({"error": message}, status, {"X-Error-Code": code})
        if file is not None:
            self.server.log[-1]["file"] = file

    def _record(self, **info):
        rec = {"method": self.command, "path": self.path, "range": self.headers.get("Range"),
               "authorization": self.headers.get("Authorization"), "file": None}
        rec.update(info)
        self.server.log.append(rec)

    def _authorized(self) -> bool:
        token = self.server.token
        if token and self.headers.get("Authorization") != f"Bearer {token}":
            self._error(401, "GatedRepo", "authentication required")
            return False
        return True

    def _route(self, head: bool):
        path = unquote(urlsplit(self.path).path)
        query = urlsplit(self.path).query
        srv = self.server
        if srv.static is not None:
            return self._static(path)
        if srv.layout == "files":
            return self._files(path)
        if self._echo():
            return
        m = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(?:/(.*))?$", path)
        if m and srv.api_delay:
            time.sleep(srv.api_delay)
        if m:
            if not self._authorized():
                return
            repo, what, rev, sub = m.groups()
            found = self._repo(repo, rev)
            if found is None:
                return
            commit, entries, _ = found
            if what == "revision":
                return self._send_json({"id": repo, "modelId": repo, "sha": commit, "private": False,
                                        "siblings": [{"rfilename": e["path"]} for e in entries
                                                     if e["type"] == "file"]})
            if sub:
                entries = [e for e in entries if e["path"].startswith(sub.rstrip("/") + "/")]
            if "recursive=true" not in query.lower() and "recursive=1" not in query:
                base = (sub.rstrip("/") + "/") if sub else ""
                entries = [e for e in entries if "/" not in e["path"][len(base):]]
            pages = self._fault("pages")
            if pages:  # two entries a page; the Link names `value` as its host (an upstream's URL)
                start = int((re.search(r"cursor=(\d+)", query) or [0, 0])[1])
                more = start + 2 < len(entries)
                entries = entries[start:start + 2]
                if more:
                    nxt = f"{pages.value}{path}?recursive=true&expand=false&cursor={start + 2}"
                    return self._send_json(entries, headers={"Link": f'<{nxt}>; rel="next"'})
                return self._send_json(entries)
            link = self._fault("link")
            return self._send_json(entries, headers={"Link": f'<{link.value}>; rel="next"'} if link else None)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            if not self._authorized():
                return
            repo, rev, rel = m.groups()
            found = self._repo(repo, rev)
            if found is None:
                return
            commit, entries, folder = found
            entry = next((e for e in entries if e["path"] == rel and e["type"] == "file"), None)
            if entry is None:
                return self._error(404, "EntryNotFound", f"{rel} not found")
            etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
            headers = {"X-Repo-Commit": commit, "ETag": f'"{etag}"'}
            if "lfs" in entry:
                headers.update({"X-Linked-Etag": f'"{etag}"', "X-Linked-Size": str(entry["size"])})
            source = folder / rel if not rel.startswith("../") else srv.escape_file
            return self._file(rel, source, headers)
        if self._hostile(path):
            return
        self._error(404, "RepoNotFound", "no such endpoint")

    def _repo(self, repo: str, rev: str):
        folder = self.server.repos.get(repo)
        if folder is None:
            self._error(404, "RepoNotFound", f"{repo} not found")
            return None
        commit, entries = repo_listing(folder)
        entries = self._lie(entries)
        if self._fault("commit"):
            commit = self._fault("commit").value
        if rev not in ("main", commit):
            self._error(404, "RevisionNotFound", f"revision {rev} not found")
            return None
        for fault in self.server.faults:
            if fault.kind == "escape" and fault.take("*"):
                data = b"escaped\n"
                self.server.escape_file.write_bytes(data)
                entries = entries + [{"type": "file", "oid": hashlib.sha1(b"blob 8\0" + data).hexdigest(),
                                      "size": len(data), "path": "../../escape.txt"}]
        return commit, entries, Path(folder)

    def _files(self, path: str):
        srv = self.server
        if path == "/lora-mirror.json" and srv.manifest:
            return self._send_json({"kind": "files", "models": {r: repo_listing(f)[0]
                                                                for r, f in srv.repos.items()}})
        m = re.match(r"^/([^/]+/[^/]+)/(.+)$", path)
        folder = srv.repos.get(m.group(1)) if m else None
        if folder is None:
            return self._error(404, "RepoNotFound")
        repo, rel = m.groups()
        if rel == "lora-manifest.json" and srv.manifest:
            return self._send_json(manifest(repo, Path(folder)))
        source = Path(folder) / rel
        if ".." in rel.split("/") or not source.is_file():
            return self._error(404, "EntryNotFound")
        self._file(rel, source, {})

    def _static(self, path: str):
        rel = path.lstrip("/")
        source = self.server.static / rel
        if ".." in rel.split("/") or not source.is_file():
            return self._error(404, "EntryNotFound")
        self._file(rel, source, {})

    def _file(self, rel: str, source: Path, headers: dict):
        size = source.stat().st_size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range") if self.server.ranges else None
        if rng:
            m = re.match(r"bytes=(\d+)-(\d*)$", rng.strip())
            if m:
                start = int(m.group(1))
                if m.group(2):
                    end = min(int(m.group(2)), size - 1)
                if start >= size and size > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return self._record(status=416, sent=0, file=rel)
                status = 206
        fault = next((f for f in self.server.faults if f.kind in ("drop", "status", "corrupt", "stall",
                                                                  "trickle")
                      and self.command == "GET" and f.take(rel)), None)
        if fault and fault.kind == "status":
            return self._error(fault.status, "ServerError", "injected failure", file=rel)
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        sent = 0
        if self.command == "HEAD":
            return self._record(status=status, sent=0, file=rel)
        try:
            with open(source, "rb") as f:
                f.seek(start)
                while sent < length:
                    if self.server.closing:
                        break
                    chunk = f.read(min(CHUNK, length - sent))
                    if not chunk:
                        break
                    if fault and fault.kind == "trickle":
                        sent += self._trickle(chunk, fault)
                        self.close_connection = True
                        break
                    if fault and fault.kind in ("drop", "stall") and sent + len(chunk) > fault.after:
                        chunk = chunk[: max(0, fault.after - sent)]
                        self.wfile.write(chunk)
                        sent += len(chunk)
                        self.wfile.flush()
                        if fault.kind == "stall":
                            deadline = time.monotonic() + fault.seconds
                            while time.monotonic() < deadline and not self.server.closing:
                                time.sleep(0.05)
                        self.close_connection = True
                        break
                    if fault and fault.kind == "corrupt" and sent == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    if self.server.delay:
                        time.sleep(self.server.delay)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        self._record(status=status, sent=sent, file=rel)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def handle_error(self, request, client_address):  # a client hanging up is not news
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


@contextmanager
def serve(repos: dict | None = None, faults: list | None = None, *, layout: str = "hub",
          manifest: bool = True, token: str | None = None, static: Path | None = None,
          delay: float = 0.0, ranges: bool = True, api_delay: float = 0.0):
    """Serve `{"org/name": folder}` on 127.0.0.1:<free port>; yields the base URL (a `Hub` str).

    `delay` sleeps that many seconds after each 64 KiB chunk (to kill a download half-way);
    `ranges=False` ignores `Range` and always answers 200 with the whole file (as olah does).
    """
    server = _Server(("127.0.0.1", 0), _Handler)
    server.repos = {k: Path(v) for k, v in (repos or {}).items()}
    server.faults = list(faults or [])
    server.layout = layout
    server.manifest = manifest
    server.token = token
    server.static = Path(static) if static is not None else None
    server.delay = delay
    server.api_delay = api_delay
    server.ranges = ranges
    server.log = []
    server.closing = False
    escape_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    server.escape_file = escape_dir / f"hubserver-escape-{os.getpid()}-{id(server)}.txt"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    url = Hub(f"http://127.0.0.1:{server.server_address[1]}")
    url.log = server.log
    url.faults = server.faults
    url.server = server
    try:
        yield url
    finally:
        server.closing = True
        server.shutdown()
        server.server_close()
        server.escape_file.unlink(missing_ok=True)


def serve_dir(folder: Path, **kw):
    """Serve a folder as plain static files (with Range), e.g. a published files-kind tree."""
    return serve(static=Path(folder), **kw)
