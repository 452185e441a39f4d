"""`lora cache list|verify|rm`, and the tiny model built into the cache with no network."""

from __future__ import annotations

import json

from hub_fixtures import online, repo, unique_bytes  # noqa: F401 (fixtures)
from hubserver import serve

from loracli.hub import models, tracking


def test_list_verify_repair_and_rm(cli, online, repo, isolated):
    with serve({"org/tiny": repo}) as url:
        fetched = json.loads(cli("fetch", "org/tiny", "--mirror", url, "--json").stdout)
        rows = json.loads(cli("cache", "list", "--json").stdout)
        assert [(r["model"], r["commit"], r["tracked"]) for r in rows] == [("org/tiny", fetched["commit"], True)]
        assert rows[0]["size"] == unique_bytes(repo) and rows[0]["files"] == len(fetched["files"])
        assert "org/tiny" in cli("cache", "list").stdout

        ok = cli("cache", "verify", "org/tiny", "--json")
        assert ok.exit_code == 0 and json.loads(ok.stdout)[0]["bad"] == []

        weights = models.local_snapshot("org/tiny") / "unet" / "diffusion_pytorch_model.safetensors"
        blob = weights.resolve()
        data = bytearray(blob.read_bytes())
        data[100] ^= 1
        blob.write_bytes(bytes(data))  # bit rot
        bad = cli("cache", "verify", "--json")
        assert bad.exit_code == 1
        doc = json.loads(bad.stdout)  # one document: the error, with what verify found
        assert doc["hint"] == "lora fetch org/tiny" and "damaged" in doc["error"]
        report = doc["result"][0]
        assert [b["path"] for b in report["bad"]] == ["unet/diffusion_pytorch_model.safetensors"]
        assert "hint: lora fetch org/tiny" in bad.stderr
        assert not blob.exists()  # deleted, so the next fetch gets it again

        # the damage stays in view until the model is fetched again
        still = cli("cache", "verify")
        assert still.exit_code == 1 and "hint: lora fetch org/tiny" in still.stderr
        assert "unet/diffusion_pytorch_model.safetensors: missing" in still.stdout
        assert "internal error" not in still.stderr
        listed = json.loads(cli("cache", "list", "--json").stdout)
        assert [(r["model"], r["missing"]) for r in listed] == [("org/tiny", 1)]

        before = url.bytes_sent()
        again = cli("fetch", "org/tiny", "--mirror", url)
        assert again.exit_code == 0, again.stderr
        assert url.bytes_sent() - before == len(data)
        assert cli("cache", "verify").exit_code == 0

    plan = cli("cache", "rm", "org/tiny", "--dry-run", "--json")
    assert plan.exit_code == 0 and json.loads(plan.stdout)["freed"] == unique_bytes(repo)
    assert models.repo_folder("org/tiny").exists() and tracking.load()
    unasked = cli("cache", "rm", "org/tiny")  # not a terminal and no --yes: nothing is removed
    assert unasked.exit_code == 1 and "hint: lora cache rm org/tiny --yes" in unasked.stderr
    assert models.repo_folder("org/tiny").exists()
    gone = cli("cache", "rm", "org/tiny", "--yes", "--json")
    assert gone.exit_code == 0 and json.loads(gone.stdout)["freed"] == unique_bytes(repo)
    assert not models.repo_folder("org/tiny").exists()
    assert tracking.load() == {}
    assert json.loads(cli("cache", "list", "--json").stdout) == []
    missing = cli("cache", "rm", "org/tiny", "--yes")
    assert missing.exit_code == 1 and "hint: lora cache list" in missing.stderr
    nothing = cli("cache", "verify", "sd15")
    assert nothing.exit_code == 1 and "hint: lora fetch sd15" in nothing.stderr


def test_fetch_tiny_sd_builds_it_offline_and_cache_tracks_it(cli, isolated):
    r = cli("fetch", "tiny-sd", "--json")  # HF_HUB_OFFLINE=1 here: no network needed
    assert r.exit_code == 0, r.stderr
    result = json.loads(r.stdout)
    snap = models.local_snapshot("tiny-sd")
    assert result["snapshot"] == str(snap) == str(models.install_tiny())
    assert (snap / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    rows = json.loads(cli("cache", "list", "--json").stdout)
    assert [(r["model"], r["repo_id"]) for r in rows] == [("tiny-sd", "loracli/tiny-sd")]
    assert json.loads(cli("cache", "verify", "tiny-sd", "--json").stdout)[0]["ok"]
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained("loracli/tiny-sd", cache_dir=isolated["cache"],
                                                   local_files_only=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"


def test_a_tiny_sd_built_by_an_older_lora_is_rebuilt(isolated):
    from loracli import tiny

    first = models.install_tiny()
    (first / tiny.BUILD_FILE).unlink()  # as left by a version that did not mark its build
    again = models.install_tiny()
    assert (again / tiny.BUILD_FILE).read_text().strip() == tiny.build_id()
    assert models.install_tiny() == again  # and from then on it is reused


def test_cache_rm_asks_on_a_terminal(cli, isolated, monkeypatch):
    from loracli.commands import cache as cache_cmd

    models.install_tiny()
    monkeypatch.setattr(cache_cmd, "_interactive", lambda: True)
    kept = cli("cache", "rm", "tiny-sd", input="n\n")
    assert kept.exit_code == 1 and "remove loracli/tiny-sd" in kept.stderr
    assert models.repo_folder("loracli/tiny-sd").exists()
    removed = cli("cache", "rm", "tiny-sd", input="y\n")
    assert removed.exit_code == 0, removed.stderr
    assert not models.repo_folder("loracli/tiny-sd").exists()
