"""Network failures on loopback, for mirror tests: a port that refuses, a server that never
answers, and names that never resolve (`.invalid` is reserved for exactly that, RFC 2606)."""

from __future__ import annotations

import socket
import threading
from contextlib import contextmanager

UNRESOLVABLE = "http://nonexistent.invalid"


def refused_url() -> str:
    """A loopback URL where nothing listens (the port was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextmanager
def silent():
    """A server that accepts connections and never says a word; yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


@contextmanager
def trickling_headers(interval: float = 0.3):
    """A server that answers with a status line and headers one byte every `interval` seconds."""
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    server.settimeout(0.1)
    stop = threading.Event()
    answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"z" * 2000 + b"\r\n\r\n"

    def talk(conn) -> None:
        with conn:
            for i in range(len(answer)):
                if stop.is_set():
                    return
                try:
                    conn.sendall(answer[i:i + 1])
                except OSError:
                    return
                time.sleep(interval)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn = server.accept()[0]
            except OSError:
                continue
            threading.Thread(target=talk, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        server.close()
