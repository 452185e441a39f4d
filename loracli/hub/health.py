"""Which mirrors can serve, in plain words: `lora mirror test`, and the first fetch's race.

`reachable` means one thing only: an HTTP answer came back from that host. Anything else is
named for what it is (`transport.describe`): the name does not resolve (DNS), the connection is
refused, the host cannot be reached, TLS fails, no answer within the timeout, or a stall.
"""

from __future__ import annotations

import queue
import threading
import time

from loracli.errors import LoraError
from loracli.hub import hubcache, models
from loracli.hub.mirrors import Mirror
from loracli.hub.transport import Client, MirrorError, file_url, token


def _ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 1)


def probe(mirror: Mirror, model: str = "sd15", file: str = "model_index.json",
          timeout: float = 10.0) -> dict:
    """Does `mirror` answer over HTTP, how fast, and does it serve a small known file?"""
    client = Client(timeout, token(), 1)
    ref = models.resolve(model)
    row = {"name": mirror.name, "url": mirror.url, "kind": mirror.kind, "state": "", "reachable": False,
           "latency_ms": None, "serves_file": False, "error": "", "retired": mirror.retired}
    start = time.monotonic()
    try:
        row["kind"] = client.kind(mirror)
        commit = ""
        if row["kind"] == "hub":
            url = f"{mirror.url}/api/models/{ref.repo_id}/revision/main"
            r = client.request(mirror, url)
            row["reachable"], row["latency_ms"] = True, _ms(start)
            client.check_status(r, url)
            info = client.read(mirror, r, url, 1 << 20)
            commit = _commit(client, info)
        url = file_url(client, mirror, ref.repo_id, commit, file)
        r = client.request(mirror, url)
        row["reachable"] = True
        row["latency_ms"] = row["latency_ms"] or _ms(start)
        client.check_status(r, url)
        row["serves_file"] = bool(client.read(mirror, r, url))
        row["state"] = "ok"
    except MirrorError as e:
        row["error"], row["state"] = str(e), e.state
    return row


def _commit(client: Client, body: bytes) -> str:
    import json

    try:
        return hubcache.check_commit(json.loads(body).get("sha"))
    except (ValueError, AttributeError, LoraError):
        raise MirrorError("the revision answer has no valid commit sha", True, "bad-answer") from None


def fastest(client: Client, ref: models.ModelRef, candidates: list[Mirror]) -> tuple[list[Mirror], list]:
    """Ask every candidate for `ref`'s revision at once; returns the candidates ordered as they
    answered (the fastest good answer first, then pending ones, then failures) and one row per
    answer seen: (mirror, ok, ms, error). Waits for the first good answer, not for the rest."""
    answers: queue.Queue = queue.Queue()

    def ask(mirror: Mirror) -> None:
        start = time.monotonic()
        try:
            if client.kind(mirror) == "files":
                url = f"{mirror.url}/{ref.repo_id}/lora-manifest.json"
            else:
                url = f"{mirror.url}/api/models/{ref.repo_id}/revision/{ref.revision}"
            r = client.request(mirror, url)
            client.check_status(r, url)
            client.read(mirror, r, url, 1 << 20)
            answers.put((mirror, True, _ms(start), ""))
        except MirrorError as e:
            answers.put((mirror, False, _ms(start), str(e)))
        except Exception as e:  # noqa: BLE001 - a thread must always answer
            answers.put((mirror, False, _ms(start), type(e).__name__))

    for m in candidates:  # daemon threads: a stalled mirror never delays the exit
        threading.Thread(target=ask, args=(m,), daemon=True, name=f"lora-probe-{m.name}").start()
    seen: list = []
    deadline = time.monotonic() + client.timeout + 2
    while len(seen) < len(candidates) and not any(ok for _, ok, _, _ in seen):
        try:
            seen.append(answers.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    good = [m for m, ok, _, _ in seen if ok]
    failed = [m for m, ok, _, _ in seen if not ok]
    pending = [m for m in candidates if m not in good and m not in failed]
    return good + pending + failed, seen
