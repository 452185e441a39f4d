"""Connections to mirrors: a urllib3 pool with a deadline for headers, and failures in plain words.

A failure is a `MirrorError` with a `state` a person can act on: `dns` (the name does not
resolve), `refused`, `unreachable`, `tls`, `timeout` (no answer to connect), `stalled` (no data,
or too little), `dropped` (cut mid-transfer), `http` (an HTTP error answer), `bad-answer`,
`unsafe`. The states in `DOWN_STATES` leave a mirror for the rest of a fetch.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from loracli.hub.hubcache import shown

DOWN_STATES = ("dns", "refused", "unreachable", "tls", "timeout", "stalled", "proxy")


class MirrorError(Exception):
    """One mirror failed one request. `permanent`: retrying the same mirror will not help."""

    def __init__(self, message: str, permanent: bool = False, state: str = "http"):
        super().__init__(message)
        self.permanent = permanent
        self.state = state


def host_words(host: str | None) -> str:
    return host or "the mirror"


def describe(error: Exception, timeout: float, url: str) -> MirrorError:
    """A urllib3 failure as a `MirrorError` in plain words."""
    import urllib3.exceptions as u

    parts = urlsplit(url)
    host = host_words(parts.hostname)
    reason = getattr(error, "reason", None) or error
    text = str(reason)
    if isinstance(reason, u.NameResolutionError):
        return MirrorError(f"DNS lookup failed: {host} does not resolve on this network "
                           "(unknown name, or DNS blocked)", state="dns")
    if isinstance(reason, u.SSLError):
        low = text.lower()
        why = ("its certificate is not trusted here" if "certificate verify failed" in low else
               "the certificate is for another host" if "hostname" in low else
               "the server does not speak TLS on that port" if ("wrong version" in low or "record layer" in low
                                                               or "unexpected eof" in low) else
               "the handshake failed")
        return MirrorError(f"TLS failed with {host}: {why}", state="tls")
    if isinstance(reason, u.ProxyError):
        return MirrorError(f"the proxy refused or failed the connection to {host}", state="proxy")
    if isinstance(reason, u.NewConnectionError):
        if "refused" in text.lower():
            return MirrorError(f"connection refused by {host}:{parts.port or _port(parts.scheme)} "
                               "(nothing listens there, or a firewall rejects it)", state="refused")
        m = re.search(r"\[Errno -?\d+\] ([^\]\)]+)", text)
        why = m.group(1).strip().lower() if m else "no route to it"
        return MirrorError(f"cannot connect to {host}: {shown(why, 60)}", state="unreachable")
    if isinstance(reason, u.ConnectTimeoutError):
        return MirrorError(f"no answer from {host} within {timeout:g} s (connection timed out)",
                           state="timeout")
    if isinstance(reason, (u.ReadTimeoutError, TimeoutError)) or "timed out" in text.lower():
        if "read timeout=" in text:  # while waiting for the status line and headers
            return MirrorError(f"stalled: no answer from {host} within {timeout:g} s", state="stalled")
        return MirrorError(f"stalled: no data from {host} for {timeout:g} s", state="stalled")
    if isinstance(reason, (u.ProtocolError, u.IncompleteRead, ConnectionError)):
        return MirrorError("connection dropped mid-transfer", state="dropped")
    return MirrorError(f"network error talking to {host}", state="network")


_POOLS: dict = {}


def _watched_pools() -> dict:
    """urllib3 pools whose connections give the status line and headers `timeout` seconds in all:
    a server trickling its headers a byte at a time never trips the socket's read timeout."""
    if not _POOLS:
        import socket
        import threading

        from urllib3.connection import HTTPConnection, HTTPSConnection
        from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

        def watched(base):
            class Watched(base):
                def getresponse(self):
                    sock, cut = self.sock, threading.Event()

                    def hang_up() -> None:
                        cut.set()
                        try:
                            sock.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass

                    limit = self.timeout if isinstance(self.timeout, (int, float)) else None
                    timer = threading.Timer(limit, hang_up) if limit else None
                    if timer:
                        timer.daemon = True
                        timer.start()
                    try:
                        return super().getresponse()
                    except Exception:
                        if cut.is_set():  # seen by urllib3 as a read time-out
                            raise TimeoutError("the answer's headers came too slowly") from None
                        raise
                    finally:
                        if timer:
                            timer.cancel()
            return Watched

        class Pool(HTTPConnectionPool):
            ConnectionCls = watched(HTTPConnection)

        class SPool(HTTPSConnectionPool):
            ConnectionCls = watched(HTTPSConnection)

        _POOLS.update(http=Pool, https=SPool)
    return _POOLS


def _port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def make_pool(timeout: float, workers: int):
    """One pool for a fetch: no urllib3 retries (lora decides), redirects followed (the
    Authorization header is dropped when the host changes), connect and read time-outs."""
    import urllib3

    pool = urllib3.PoolManager(
        num_pools=8, maxsize=max(4, workers),
        retries=urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5),
        timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
    )
    pool.pool_classes_by_scheme = _watched_pools()
    return pool
