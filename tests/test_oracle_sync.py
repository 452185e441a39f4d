"""`lora mirror sync` as a user checks it: a failed sync leaves the last good update's time
exactly as it was (compared as stored, after moving it far into the past, so a failure that
re-stamps it cannot hide inside the same second)."""

from __future__ import annotations

import json

from hub_fixtures import online, repo  # noqa: F401 (fixtures)
from hubserver import serve

from loracli.hub import sync

LONG_AGO = ("2020-01-02T03:04:05Z", 1577934245)


def _status(cli) -> dict:
    result = cli("mirror", "status", "--json")
    assert result.exit_code == 0, result.stderr
    return {row["name"]: row for row in json.loads(result.stdout)}


def test_failed_sync_keeps_last_update_exactly(cli, online, repo):
    with serve({"org/tiny": repo}) as url:
        assert cli("fetch", "org/tiny", "--mirror", url).exit_code == 0
        assert cli("mirror", "sync", "--mirror", url).exit_code == 0
    good = _status(cli)["org/tiny"]
    assert good["status"] == "success" and good["last_update"]
    # the last good sync happened long ago (as on a mirror whose upstream has been down a while)
    path = sync.status_file()
    saved = json.loads(path.read_text("utf-8"))
    saved["models"]["org/tiny"].update(last_update=LONG_AGO[0], last_update_ts=LONG_AGO[1])
    path.write_text(json.dumps(saved), "utf-8")
    before = _status(cli)["org/tiny"]
    assert (before["last_update"], before["last_update_ts"]) == LONG_AGO

    with serve({}) as empty:
        failed = cli("mirror", "sync", "--mirror", empty, "--json")
    assert failed.exit_code == 1
    after = _status(cli)["org/tiny"]
    assert after["status"] == "failed" and "RepoNotFound" in after["error_msg"]
    assert (after["last_update"], after["last_update_ts"]) == LONG_AGO
    assert after["last_ended_ts"] > LONG_AGO[1]  # the failed attempt itself was recorded
    assert (after["commit"], after["size"]) == (before["commit"], before["size"])
    reported = json.loads(failed.stdout)["models"][0]
    assert (reported["last_update"], reported["last_update_ts"]) == LONG_AGO
