"""Mirror health that is true, and fallback that costs one timeout per mirror, not per file:
loopback servers that refuse, stay silent, trickle, speak no TLS, and names that never resolve."""

from __future__ import annotations

import json
import time

from hub_fixtures import online, repo  # noqa: F401 (fixtures)
from hubserver import Fault, serve
from netfaults import UNRESOLVABLE, refused_url, silent, trickling_headers

from loracli import settings
from loracli.hub import mirrors, models

INTERNALS = ("urllib3", "HTTPConnection", "HTTPSConnection", "MaxRetryError", "NameResolutionError",
             "NewConnectionError", "Errno", "Traceback")


def _five_files(folder):
    (folder / "unet").mkdir(parents=True)
    (folder / "vae").mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    for comp in ("unet", "vae"):
        (folder / comp / "config.json").write_text(json.dumps({"component": comp}))
        (folder / comp / "diffusion_pytorch_model.safetensors").write_bytes(bytes(range(256)) * 400)
    return folder


def test_mirror_test_names_each_failure_and_exits_1_when_none_serves(cli, online, repo):
    with serve({"org/tiny": repo}) as plain, silent() as quiet, trickling_headers() as slow:
        tls = plain.replace("http://", "https://")
        start = time.monotonic()
        r = cli("mirror", "test", UNRESOLVABLE, refused_url(), tls, quiet, slow, "--model", "org/tiny",
                "--timeout", "1", "--json")
        took = time.monotonic() - start
        human = cli("mirror", "test", UNRESOLVABLE, quiet, "--model", "org/tiny", "--timeout", "1")
    assert r.exit_code == 1
    doc = json.loads(r.stdout)  # one document: the error, and every row
    rows = doc["result"]
    assert [x["state"] for x in rows] == ["dns", "refused", "tls", "stalled", "stalled"]
    assert not any(x["reachable"] or x["serves_file"] for x in rows)  # no HTTP answer from any
    assert rows[0]["error"].startswith("DNS lookup failed: nonexistent.invalid does not resolve")
    assert rows[1]["error"].startswith("connection refused by 127.0.0.1:")
    assert rows[2]["error"] == "TLS failed with 127.0.0.1: the server does not speak TLS on that port"
    assert rows[3]["error"] == rows[4]["error"] == "stalled: no answer from 127.0.0.1 within 1 s"
    assert took < 15  # the trickled headers would take ten minutes
    assert human.exit_code == 1 and "error: no mirror serves" in human.stderr and "hint:" in human.stderr
    assert "DNS lookup failed" in human.stdout
    for text in (r.stdout + r.stderr, human.stdout + human.stderr):
        assert not any(word in text for word in INTERNALS), text


def test_a_fetch_through_an_unresolvable_mirror_says_dns_in_plain_words(cli, online):
    r = cli("fetch", "org/tiny", "--mirror", UNRESOLVABLE, "--strict")
    assert r.exit_code == 1
    assert "DNS lookup failed: nonexistent.invalid does not resolve on this network" in r.stderr
    hint = next(line for line in r.stderr.splitlines() if line.startswith("hint:"))
    assert "nonexistent.invalid" not in hint
    assert not any(word in r.stderr for word in INTERNALS), r.stderr


def test_a_trickling_mirror_counts_as_stalled_and_fetch_falls_back(cli, online, repo, isolated):
    trickle = Fault("trickle", "unet/diffusion_pytorch_model.safetensors", times=0, seconds=0.2, after=20)
    with serve({"org/tiny": repo}, faults=[trickle]) as slow, serve({"org/tiny": repo}) as good:
        settings.update(lambda d: d.update(mirrors={"good": {"url": good}}, mirror_order=["good"]))
        start = time.monotonic()
        r = cli("fetch", "org/tiny", "--mirror", slow, "--timeout", "1", "--json")
        took = time.monotonic() - start
        assert r.exit_code == 0, r.stderr
        assert "stalled:" in r.stderr and "under the 10 KB/s a mirror must keep" in r.stderr
        assert "; retry" not in r.stderr  # a stall leaves the mirror at once
        assert good.bytes_sent("unet/diffusion_pytorch_model.safetensors") > 190_000  # (resumed)
    assert took < 15  # the trickle would take hours; the stall rule ends it after about a second
    snap = models.local_snapshot("org/tiny")
    assert (snap / "unet/diffusion_pytorch_model.safetensors").read_bytes() == \
        (repo / "unet/diffusion_pytorch_model.safetensors").read_bytes()


def test_stalled_refused_good_costs_one_timeout_not_one_per_file(cli, online, tmp_path):
    """The issue's timing test: mirrors [stalled, refused, good], `--timeout 3`, a 5-file model."""
    folder = _five_files(tmp_path / "five")
    stall = Fault("stall", "*", times=0, after=0, seconds=60)
    with serve({"org/five": folder}, faults=[stall]) as stalled, serve({"org/five": folder}) as good:
        for name, url in (("stalled", stalled), ("refused", refused_url()), ("good", good)):
            assert cli("mirror", "add", name, url).exit_code == 0
        assert cli("mirror", "use", "stalled", "refused", "good").exit_code == 0
        start = time.monotonic()
        r = cli("fetch", "org/five", "--timeout", "3", "--json")
        took = time.monotonic() - start
        assert r.exit_code == 0, r.stderr
        asked = [x["file"] for x in stalled.requests("*", "GET")]
    assert len(asked) == len(set(asked)) <= 4  # each file at most once, only those in flight
    assert json.loads(r.stdout)["mirror"] == "good"
    assert "stalled: no data from 127.0.0.1 for 3 s" in r.stderr
    assert took < 2 * 3 + 2.5, f"{took:.1f} s"  # one timeout, plus slack for a loaded machine


def test_fetch_json_lists_files_the_same_way_with_and_without_dry_run(cli, online, repo):
    with serve({"org/tiny": repo}) as url:
        plan = json.loads(cli("fetch", "org/tiny", "--mirror", url, "--dry-run", "--json").stdout)
        done = json.loads(cli("fetch", "org/tiny", "--mirror", url, "--json").stdout)
    assert isinstance(plan["files"], list) and isinstance(done["files"], list)
    assert [(f["path"], f["size"], f["sha256"]) for f in plan["files"]] == \
        [(f["path"], f["size"], f["sha256"]) for f in done["files"]]
    assert not any(f["cached"] for f in plan["files"])


def test_a_first_fetch_races_the_mirrors_and_remembers_the_fastest(cli, online, repo):
    with serve({"org/tiny": repo}, api_delay=1.5) as slow, serve({"org/tiny": repo}) as fast:
        # the built-in names, pointed at loopback: hf-mirror (first by default) is the slow one
        settings.save({"mirrors": {"hf-mirror": {"url": slow}, "hf": {"url": fast}}})
        assert mirrors.needs_probe()
        r = cli("fetch", "org/tiny", "--json")
        assert r.exit_code == 0, r.stderr
        assert json.loads(r.stdout)["mirror"] == "hf"
        assert "hf answered first" in r.stderr
        assert mirrors.remembered()["order"] == ["hf", "hf-mirror"]
        rows = json.loads(cli("mirror", "list", "--json").stdout)
        assert rows[0]["name"] == "hf" and rows[0]["order_set_by"].startswith("fastest answer on")
        asked_slow = len(slow.log)
        again = cli("fetch", "org/tiny")
        assert again.exit_code == 0 and "answered first" not in again.stderr  # no second race
        assert len(slow.log) == asked_slow
    assert slow.bytes_sent() == 0
