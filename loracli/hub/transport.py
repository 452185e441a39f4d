"""HTTP to mirrors: one connection pool, failures in plain words, the stall rule, no token leaks.

- A failure is a `MirrorError` whose `state` a person can act on (`connections.describe`: DNS,
  refused, TLS, stalled…; never urllib3's own text); `Pace` adds the minimum-throughput rule.
- A mirror that fails at the connection level or stalls is marked down in `Client.down`, and
  every later request of the same fetch to it fails at once: one timeout per mirror, not per file.
- `HF_TOKEN` goes only to hub-kind mirrors; every piece of server text that ends up in a message
  passes `Client.clean`, which removes the token (a hub may echo the Authorization header).
"""

from __future__ import annotations

import os
import re
import time
from urllib.parse import quote, urlsplit

from loracli import __version__
from loracli.hub.connections import (DOWN_STATES, MirrorError, describe, host_words,  # noqa: F401
                                     make_pool)
from loracli.hub.hubcache import shown
from loracli.hub.mirrors import Mirror

CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0
DEFAULT_MIN_SPEED_KB = 10.0
MAX_JSON = 64 << 20


def token() -> str | None:
    return os.environ.get("HF_TOKEN") or None


def timeout_default() -> float:
    try:
        return float(os.environ.get("LORA_TIMEOUT", DEFAULT_TIMEOUT))
    except ValueError:
        return DEFAULT_TIMEOUT


def min_speed() -> float:
    """Bytes/s under which a transfer counts as stalled (`LORA_MIN_SPEED` in KB/s; 0: no rule)."""
    try:
        return max(0.0, float(os.environ.get("LORA_MIN_SPEED", DEFAULT_MIN_SPEED_KB))) * 1000
    except ValueError:
        return DEFAULT_MIN_SPEED_KB * 1000


def redact(text: str, secret: str | None) -> str:
    """`text` without the token, any `hf_…` token, or the value of a `Bearer` header."""
    if secret:
        text = text.replace(secret, "***")
    text = re.sub(r"\bhf_[A-Za-z0-9]{6,}", "hf_***", text)
    return re.sub(r"(?i)(bearer\s+)[^\s,;\"']+", r"\1***", text)


def redact_all(obj, secret: str | None):
    """Every string in a JSON-like value, redacted."""
    if isinstance(obj, str):
        return redact(obj, secret)
    if isinstance(obj, dict):
        return {k: redact_all(v, secret) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_all(v, secret) for v in obj]
    return obj


class Pace:
    """The stall rule. The socket's read timeout catches silence; this catches a trickle: over
    any `timeout` seconds, fewer bytes than `min_speed()` would have brought (or than were left)."""

    def __init__(self, timeout: float, remaining: int | None, host: str):
        self.timeout, self.host, self.rate = timeout, host, min_speed()
        self.mark, self.left, self.got = time.monotonic(), remaining, 0

    def add(self, n: int) -> None:
        self.got += n
        elapsed = time.monotonic() - self.mark
        if elapsed < self.timeout or not self.rate:
            return
        need = self.rate * elapsed if self.left is None else min(self.rate * elapsed, self.left)
        if self.got < need:
            raise MirrorError(f"stalled: {host_words(self.host)} sent {self.got / elapsed:,.0f} B/s "
                              f"for {elapsed:.0f} s, under the {self.rate / 1000:g} KB/s a mirror "
                              "must keep (LORA_MIN_SPEED)", state="stalled")
        if self.left is not None:
            self.left -= self.got
        self.mark, self.got = time.monotonic(), 0


class Client:
    """HTTP to mirrors for one fetch: shared pool, per-request endpoint, mirrors marked down."""

    def __init__(self, timeout: float | None = None, secret: str | None = None, workers: int = 4):
        import urllib3

        self.timeout = timeout or timeout_default()
        self.token = secret
        self._urllib3 = urllib3
        self.pool = make_pool(self.timeout, workers)
        self._kinds: dict[str, str] = {}
        self.down: dict[str, MirrorError] = {}

    def clean(self, text: object, limit: int = 300) -> str:
        """Server-supplied text as it may be shown: token removed, control characters escaped."""
        return shown(redact(str(text), self.token), limit)

    def headers(self, mirror: Mirror, extra: dict | None = None) -> dict:
        h = {"User-Agent": f"lora/{__version__}", "Accept-Encoding": "identity"}
        if self.token and self.kind(mirror) == "hub":
            h["Authorization"] = f"Bearer {self.token}"
        h.update(extra or {})
        return h

    def mark_down(self, mirror: Mirror, error: MirrorError) -> None:
        """Leave `mirror` for the rest of this fetch (after a stall, DNS failure, refusal…)."""
        if error.state in DOWN_STATES or error.state == "given-up":
            self.down.setdefault(mirror.url, error)

    def request(self, mirror: Mirror, url: str, headers: dict | None = None, stream: bool = False,
                auth: bool = True):
        if mirror.url in self.down:
            err = self.down[mirror.url]
            raise MirrorError(str(err), err.permanent, err.state)
        h = self.headers(mirror, headers) if auth else {"User-Agent": f"lora/{__version__}"}
        try:
            return self.pool.request("GET", url, headers=h, preload_content=False,
                                     decode_content=False)
        except self._urllib3.exceptions.HTTPError as e:
            err = describe(e, self.timeout, url)
            self.mark_down(mirror, err)
            raise err from None

    def chunks(self, mirror: Mirror, r, url: str, remaining: int | None = None):
        """The body of `r`, as it arrives, under the stall rule."""
        pace = Pace(self.timeout, remaining, urlsplit(url).hostname)
        block, size, since = [], 0, time.monotonic()
        while True:  # read1: whatever one recv brings, so a trickle is seen as it happens
            failure = None
            try:
                chunk = r.read1(CHUNK)
                if chunk:
                    block.append(chunk)
                    size += len(chunk)
                    pace.add(len(chunk))
            except self._urllib3.exceptions.HTTPError as e:
                failure, chunk = describe(e, self.timeout, url), b""
            except MirrorError as e:
                failure, chunk = e, b""
            if block and (not chunk or size >= CHUNK or time.monotonic() - since > 0.25):
                yield block[0] if len(block) == 1 else b"".join(block)  # ~1 MiB: less Python per byte
                block, size, since = [], 0, time.monotonic()
            if failure is not None:  # what came before the failure is kept (a resume starts there)
                self.mark_down(mirror, failure)
                raise failure
            if not chunk:
                return

    def read(self, mirror: Mirror, r, url: str, limit: int = MAX_JSON) -> bytes:
        body = bytearray()
        try:
            for chunk in self.chunks(mirror, r, url):
                body += chunk
                if len(body) > limit:
                    raise MirrorError(f"answer larger than {limit >> 20} MB", True, "bad-answer")
        except BaseException:
            self.discard(r)
            raise
        r.release_conn()
        return bytes(body)

    def get_json(self, mirror: Mirror, url: str):
        import json

        r = self.request(mirror, url)
        self.check_status(r, url)
        data = self.read(mirror, r, url)
        try:
            return json.loads(data), r.headers
        except ValueError:
            raise MirrorError(f"{self.clean(url, 120)}: not JSON (is this a {mirror.kind} mirror?)",
                              True, "bad-answer") from None

    def kind(self, mirror: Mirror) -> str:
        """hub or files; a bare URL is files-kind when it serves `lora-mirror.json`."""
        if mirror.kind != "auto":
            return mirror.kind
        if mirror.url not in self._kinds:
            kind = "hub"
            try:  # no token: we do not know yet what this server is
                r = self.request(mirror, mirror.url + "/lora-mirror.json", auth=False)
                if r.status == 200:
                    import json

                    data = json.loads(self.read(mirror, r, mirror.url, 1 << 20))
                    kind = "files" if isinstance(data, dict) and data.get("kind") == "files" else "hub"
                else:
                    self.discard(r)
            except (MirrorError, ValueError):
                pass
            self._kinds[mirror.url] = kind
        return self._kinds[mirror.url]

    @staticmethod
    def discard(r) -> None:
        """Drop an answer without reading its body (a hostile server may send no end of it)."""
        r.close()
        r.release_conn()

    def check_status(self, r, url: str) -> None:
        """An HTTP error answer as a `MirrorError`, with the hub's error code and message
        (redacted: a hub may echo the Authorization header) and the body drained."""
        if r.status < 300:
            return
        code = self.clean(r.headers.get("X-Error-Code", ""), 60)
        msg = self.clean(r.headers.get("X-Error-Message", ""), 160)
        self.discard(r)
        said = " ".join(x for x in (code, f"({msg})" if msg else "") if x)
        if r.status in (401, 403):
            raise MirrorError(f"HTTP {r.status} {said or 'unauthorized'} (gated or private? set HF_TOKEN)",
                              True)
        if r.status == 404:
            raise MirrorError(f"HTTP 404 {said or 'not found'}", True)
        if r.status == 416:
            raise MirrorError("HTTP 416: stale partial file, starting it over")
        raise MirrorError(f"HTTP {r.status}{' ' + said if said else ''}", r.status < 500 and r.status != 429)


def file_url(client: Client, mirror: Mirror, repo_id: str, commit: str, path: str) -> str:
    if client.kind(mirror) == "files":
        return f"{mirror.url}/{repo_id}/{quote(path, safe='/')}"
    return f"{mirror.url}/{repo_id}/resolve/{commit}/{quote(path, safe='/')}"
