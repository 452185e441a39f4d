"""`lora mirror`: configuration, `test`, and `sync` (unchanged, changed, failed, locked, published)."""

from __future__ import annotations

import json
import threading
import time

from filelock import FileLock
from hub_fixtures import lora_proc, make_repo, online, repo  # noqa: F401 (fixtures)
from hubserver import serve, serve_dir

from loracli import paths, settings
from loracli.hub import client as hub
from loracli.hub import mirrors, models, sync


def test_mirror_list_add_use_remove(cli, monkeypatch):
    rows = json.loads(cli("mirror", "list", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["hf-mirror"]["role"] == "default" and by_name["hf"]["role"] == "fallback 1"  # README
    assert rows[0]["order_set_by"].startswith("nothing yet")
    assert by_name["tuna"]["kind"] == "files" and "2021" in by_name["tuna"]["status"]
    assert cli("mirror", "add", "corp", "https://hf.corp.example/", "--kind", "hub").exit_code == 0
    assert mirrors.get("corp").url == "https://hf.corp.example"
    r = cli("mirror", "use", "corp", "hf")
    assert r.exit_code == 0, r.stderr
    assert [m.name for m in mirrors.chain()] == ["corp", "hf"]
    assert [m.name for m in mirrors.chain("hf-mirror")] == ["hf-mirror", "corp", "hf"]
    assert [m.name for m in mirrors.chain(strict=True)] == ["corp"]
    listed = json.loads(cli("mirror", "list", "--json").stdout)
    assert [(x["name"], x["role"]) for x in listed[:3]] == [("corp", "default"), ("hf", "fallback 1"),
                                                            ("hf-mirror", "")]
    assert listed[0]["order_set_by"] == "lora mirror use"
    assert "order set by: lora mirror use" in cli("mirror", "list").stderr
    monkeypatch.setenv("LORA_MIRROR", "https://other.example,hf-mirror")
    assert mirrors.chain()[0].url == "https://other.example" and mirrors.chain()[0].kind == "auto"
    assert [m.name for m in mirrors.chain()][1:] == ["hf-mirror"]
    assert json.loads(cli("mirror", "list", "--json").stdout)[0]["order_set_by"] == "LORA_MIRROR"
    monkeypatch.delenv("LORA_MIRROR")
    assert cli("mirror", "remove", "corp").exit_code == 0
    assert settings.load()["mirror_order"] == ["hf"]
    bad = cli("mirror", "add", "hf", "https://x.example")
    assert bad.exit_code == 1 and "built-in" in bad.stderr and "hint: lora mirror add my-hf" in bad.stderr
    assert cli("mirror", "add", "x", "ftp://x", "--kind", "hub").exit_code == 1
    assert cli("mirror", "add", "x", "https://x", "--kind", "git").exit_code == 1
    unknown = cli("fetch", "sd15", "--mirror", "nowhere")
    assert unknown.exit_code == 1 and "hint: lora mirror add nowhere" in unknown.stderr
    assert cli("mirror", "use", "tuna").exit_code == 1
    assert cli("mirror", "use", "hf", "nowhere").exit_code == 1
    assert settings.load()["mirror_order"] == ["hf"]  # a failed `use` changes nothing


def test_an_old_config_keeps_its_default_and_fallbacks():
    settings.save({"default_mirror": "hf", "fallbacks": ["hf-mirror"]})
    assert mirrors.order() == (["hf", "hf-mirror"], "lora mirror use")


def test_mirror_test_reports_reachability_and_the_known_file(cli, online, repo):
    with serve({"org/tiny": repo}) as hub_url, serve({"org/tiny": repo}, layout="files") as files_url, \
            serve({}) as empty:
        cli("mirror", "add", "local", hub_url)
        r = cli("mirror", "test", "local", files_url, empty, "http://127.0.0.1:9", "--model", "org/tiny",
                "--timeout", "2", "--json")
    assert r.exit_code == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [(x["reachable"], x["serves_file"], x["state"]) for x in rows] == [
        (True, True, "ok"), (True, True, "ok"), (True, False, "http"), (False, False, "refused")]
    assert rows[0]["kind"] == "hub" and rows[1]["kind"] == "files"
    assert rows[0]["latency_ms"] > 0 and "RepoNotFound" in rows[2]["error"]
    assert rows[3]["error"].startswith("connection refused by 127.0.0.1:9")


def test_sync_unchanged_transfers_nothing_and_changed_transfers_one_file(cli, online, repo):
    with serve({"org/tiny": repo}) as url:
        cli("mirror", "add", "local", url)
        cli("mirror", "use", "local")
        assert cli("fetch", "org/tiny").exit_code == 0
        first = url.bytes_sent()

        r = cli("mirror", "sync", "--json")
        assert r.exit_code == 0, r.stderr
        entry = json.loads(r.stdout)["models"][0]
        assert url.bytes_sent() == first
        assert (entry["status"], entry["transferred"], entry["changed"]) == ("success", 0, False)
        assert "\r" not in r.stderr  # no progress bars off a terminal

        (repo / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"new weights" * 1000)
        r = cli("mirror", "sync", "org/tiny", "--json")
        assert r.exit_code == 0, r.stderr
        entry = json.loads(r.stdout)["models"][0]
        assert url.bytes_sent() - first == 11000 == entry["transferred"]
        assert [x["file"] for x in url.log[-1:]] == ["vae/diffusion_pytorch_model.safetensors"]
    assert entry["changed"] and entry["commit"] != entry["previous_commit"]
    snap = models.local_snapshot("org/tiny")
    assert snap.name == entry["commit"]
    assert (snap / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == b"new weights" * 1000
    old_snapshots = list(models.repo_folder("org/tiny").joinpath("snapshots").iterdir())
    assert len(old_snapshots) == 2  # the previous commit stays until --prune
    (repo / "unet" / "config.json").write_text('{"component": "unet", "v": 2}')
    with serve({"org/tiny": repo}) as url2:
        r = cli("mirror", "sync", "--mirror", url2, "--prune", "--json")
        assert r.exit_code == 0, r.stderr
    entry = json.loads(r.stdout)["models"][0]
    assert entry["pruned"] == 200_000 + len('{"component": "unet"}')  # first vae weights, old config
    assert [p.name for p in models.repo_folder("org/tiny").joinpath("snapshots").iterdir()] == [entry["commit"]]
    assert cli("cache", "verify").exit_code == 0
    status = json.loads(cli("mirror", "status", "--json").stdout)
    assert status[0]["status"] == "success" and status[0]["last_update_ts"] >= status[0]["last_started_ts"]
    assert json.loads(cli("cache", "list", "--json").stdout)[0]["last_sync"] == status[0]["last_update"]


def test_failed_sync_exits_1_and_keeps_last_update(cli, online, repo):
    with serve({"org/tiny": repo}) as url:
        assert cli("fetch", "org/tiny", "--mirror", url).exit_code == 0
        assert cli("mirror", "sync", "--mirror", url).exit_code == 0
    good = sync.load_status()["org/tiny"]
    with serve({}) as empty:
        r = cli("mirror", "sync", "--mirror", empty, "--json")
    assert r.exit_code == 1
    entry = json.loads(r.stdout)["models"][0]
    assert entry["status"] == "failed" and "RepoNotFound" in entry["error_msg"]
    assert entry["last_update"] == good["last_update"]
    assert entry["last_ended_ts"] >= good["last_ended_ts"]
    assert "failed" in cli("mirror", "status").stdout


def test_second_sync_at_once_exits_2_unless_it_waits(cli, online, repo):
    with serve({"org/tiny": repo}) as url:
        assert cli("fetch", "org/tiny", "--mirror", url).exit_code == 0
        held, release = threading.Event(), threading.Event()

        def other_sync():  # stands in for a sync in another process, holding the lock
            with FileLock(str(paths.state_dir() / "sync.lock")):
                held.set()
                release.wait(10)
                time.sleep(0.3)

        holder = threading.Thread(target=other_sync)
        holder.start()
        held.wait(5)
        busy = cli("mirror", "sync", "--mirror", url)
        assert busy.exit_code == 2
        assert "another `lora mirror sync` is running" in busy.stderr and "--wait" in busy.stderr
        release.set()
        waited = cli("mirror", "sync", "--mirror", url, "--wait")
        holder.join()
        assert waited.exit_code == 0, waited.stderr


def test_two_sync_processes_one_runs_one_is_refused(online, repo, tmp_path):
    with serve({"org/tiny": repo}) as url:
        assert hub.fetch("org/tiny", mirror=url, strict=True)["downloaded"] > 0
        (repo / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"x" * 1_000_000)
        url.server.delay = 0.15  # 16 chunks of 64 KiB: the first sync holds the lock ~2.5 s
        mark = len(url.log)
        first = lora_proc("mirror", "sync", "--mirror", url, "--strict")
        deadline = time.monotonic() + 20
        while not any("/api/models/" in r["path"] for r in url.log[mark:]) and time.monotonic() < deadline:
            time.sleep(0.02)  # the first sync has the lock and is asking the mirror
        second = lora_proc("mirror", "sync", "--mirror", url, "--strict")
        out2 = second.communicate(timeout=60)
        out1 = first.communicate(timeout=60)
    assert (first.returncode, second.returncode) == (0, 2), (out1, out2)
    assert "another `lora mirror sync` is running" in out2[1]


def test_publish_tree_serves_a_files_kind_fetch_that_diffusers_loads(cli, online, tiny_sd, tmp_path,
                                                                     isolated, monkeypatch):
    site = tmp_path / "site"
    with serve({"org/pipe": tiny_sd}) as url:
        assert cli("fetch", "org/pipe", "--mirror", url, "--exclude", ".built").exit_code == 0
        r = cli("mirror", "sync", "--mirror", url, "--publish", site, "--json")
        assert r.exit_code == 0, r.stderr
    index = json.loads((site / "lora-mirror.json").read_text())
    manifest = json.loads((site / "org/pipe/lora-manifest.json").read_text())
    assert index["models"] == {"org/pipe": manifest["commit"]}
    assert {f["path"] for f in manifest["files"]} == {p.relative_to(tiny_sd).as_posix()
                                                       for p in tiny_sd.rglob("*")
                                                       if p.is_file() and p.name != ".built"}

    monkeypatch.setenv("LORA_CACHE", str(tmp_path / "team-cache"))  # a teammate's machine
    with serve_dir(site) as team:
        r = cli("fetch", "org/pipe", "--mirror", team, "--strict", "--json")
        assert r.exit_code == 0, r.stderr
        served = sum(x["sent"] for x in team.log
                     if x["file"] and not x["file"].endswith(("lora-manifest.json", "lora-mirror.json")))
        assert served == sum(f["size"] for f in manifest["files"])
    assert json.loads(r.stdout)["commit"] == manifest["commit"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(models.local_snapshot("org/pipe"), local_files_only=True)
    assert pipe.text_encoder.config.hidden_size == 32


def test_names_for_completion_are_cheap(isolated):
    import subprocess
    import sys

    settings.save({"mirrors": {"corp": {"url": "https://hf.corp.example"}}})
    (isolated["cache"] / "models--someorg--thing" / "snapshots").mkdir(parents=True)
    code = ("import sys\nfrom loracli.hub import mirrors, models\n"
            "print(' '.join(models.names())); print(' '.join(mirrors.names()))\n"
            "print(','.join(m for m in ('torch', 'diffusers', 'huggingface_hub', 'urllib3', 'filelock')"
            " if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    aliases, names, heavy = out.stdout.split("\n")[:3]
    offered = aliases.split()
    assert offered[:4] == ["sd15", "sd21", "sd21-base", "sdxl"]  # aliases first, then the cache
    assert {"flux-dev", "sd35-medium", "qwen2.5-0.5b-instruct", "tiny-sd", "tiny-llama"} <= set(offered)
    assert offered[-1] == "someorg/thing" and len(offered) == len(set(offered))
    assert names.split() == ["hf", "hf-mirror", "tuna", "corp"]
    assert heavy == ""
