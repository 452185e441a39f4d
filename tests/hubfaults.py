"""The faults of a hub that misbehaves on purpose (see `hubserver`): made-up commits and oids,
file names no file system takes, an Authorization header echoed back, a body that trickles."""

from __future__ import annotations

import fnmatch
import time


class HostileHub:
    """Mixed into hubserver's request handler; reads `self.server.faults`."""

    def _fault(self, kind: str):
        return next((f for f in self.server.faults if f.kind == kind), None)

    def _echo(self) -> bool:
        fault = self._fault("echo")
        if fault is None or not fault.take("*"):
            return False
        said = self.headers.get("Authorization", "")
        self._send_json({"error": f"bad credentials {said}"}, fault.status,
                        {"X-Error-Code": said, "X-Error-Message": f"you sent {said}"})
        return True

    def _hostile(self, path: str) -> bool:
        """A hub that answers for its made-up commit whatever path the client asks for."""
        if self._fault("commit") is None or len(self.server.repos) != 1:
            return False
        repo = next(iter(self.server.repos))
        commit, entries, folder = self._repo(repo, "main")
        if path.startswith("/api/"):
            self._send_json(entries)
            return True
        entry = next((e for e in entries if e["type"] == "file" and path.endswith("/" + e["path"])), None)
        if entry is None:
            return False
        self._file(entry["path"], folder / entry["path"], {"X-Repo-Commit": commit})
        return True

    def _lie(self, entries: list) -> list:
        out = []
        for e in entries:
            fault = next((f for f in self.server.faults if f.kind == "oid" and e["type"] == "file"
                          and fnmatch.fnmatchcase(e["path"], f.path)), None)
            if fault and "lfs" in e:
                e = {**e, "lfs": {**e["lfs"], "oid": fault.value}}
            elif fault:
                e = {**e, "oid": fault.value}
            out.append(e)
        for fault in self.server.faults:
            if fault.kind == "name":
                out.append({"type": "file", "oid": "0" * 40, "size": 3, "path": fault.value})
        return out

    def _trickle(self, chunk: bytes, fault) -> int:
        """One byte every `fault.seconds`, for at most `fault.after` seconds; bytes sent."""
        sent, end = 0, time.monotonic() + (fault.after or 30)
        for byte in chunk:
            if self.server.closing or time.monotonic() > end:
                break
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            sent += 1
            time.sleep(fault.seconds)
        return sent
