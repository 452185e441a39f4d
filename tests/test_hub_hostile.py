"""A hostile hub cannot make `lora fetch` write, link or leave anything outside the model cache,
nor make it print the token: every name from a mirror is checked before it touches the disk."""

from __future__ import annotations

import json
from pathlib import Path

from hub_fixtures import online, repo  # noqa: F401 (fixtures)
from hubserver import Fault, serve

from loracli.hub import models, sync

ESCAPE_COMMIT = "../../../../outside/" + "a" * 20  # 40 characters, as a sha would be


def _outside(isolated) -> Path:
    """The folder a `../../../../` from the cache's repo folders lands in."""
    assert models.repo_folder("org/tiny").parents[2] == isolated["tmp"]
    folder = isolated["tmp"] / "outside"
    folder.mkdir()
    return folder


def _files(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.is_symlink(), p.read_bytes() if p.is_file() else None)
            for p in folder.rglob("*")}


def _refused_cleanly(r) -> None:
    assert r.exit_code == 1
    assert "error:" in r.stderr and "hint:" in r.stderr
    assert "internal error" not in r.stderr and "verified" not in r.stderr + r.stdout


def test_a_commit_sha_that_is_a_path_escape_writes_nothing_outside(cli, online, repo, isolated):
    outside = _outside(isolated)
    victim = outside / ("a" * 20) / "model_index.json"
    victim.parent.mkdir()
    victim.write_text("the user's own file")
    before = _files(outside)
    with serve({"org/tiny": repo}, faults=[Fault("commit", value=ESCAPE_COMMIT)]) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
        sent = url.bytes_sent()
    assert _files(outside) == before and not victim.is_symlink()
    _refused_cleanly(r)
    assert "is not a 40-hex sha" in r.stderr and sent == 0
    assert not (models.repo_folder("org/tiny") / "refs" / "main").exists()


def test_an_lfs_oid_that_is_a_path_escape_is_refused(cli, online, repo, isolated):
    outside = _outside(isolated)
    (outside / "victim.txt").write_text("the user's own file")
    before = _files(outside)
    fault = Fault("oid", "unet/diffusion_pytorch_model.safetensors", value="../../../../outside/victim.txt")
    with serve({"org/tiny": repo}, faults=[fault]) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
        sent = url.bytes_sent()
    assert _files(outside) == before
    _refused_cleanly(r)
    assert "LFS oid '../../../../outside/victim.txt'" in r.stderr and "not a sha256" in r.stderr
    assert sent == 0
    snap = models.repo_folder("org/tiny") / "snapshots"
    assert not snap.exists() or not [p for p in snap.rglob("*") if p.is_symlink()]


def test_an_escaping_oid_with_a_dropped_connection_leaves_nothing_outside(cli, online, repo, isolated):
    outside = _outside(isolated)
    faults = [Fault("oid", "vae/*.safetensors", value="../../../../outside/escaped"),
              Fault("drop", "vae/*.safetensors", after=1000, times=0)]
    with serve({"org/tiny": repo}, faults=faults) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
    _refused_cleanly(r)
    assert _files(outside) == {}


def test_a_git_oid_that_is_no_sha1_is_refused(cli, online, repo, isolated):
    with serve({"org/tiny": repo}, faults=[Fault("oid", "unet/config.json", value="f" * 39 + "/")]) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
    _refused_cleanly(r)
    assert "git oid" in r.stderr and "not a sha1" in r.stderr


def test_a_nul_in_a_file_name_is_a_clear_error(cli, online, repo, isolated):
    entries_before = sorted(p.name for p in isolated["tmp"].iterdir())
    with serve({"org/tiny": repo}, faults=[Fault("name", value="unet/bad\x00name.json")]) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict", "--json")
    _refused_cleanly(r)
    assert "NUL or control character" in r.stderr and "bad\\x00name.json" in r.stderr
    assert json.loads(r.stdout)["hint"]
    assert sorted(p.name for p in isolated["tmp"].iterdir()) == entries_before
    assert not models.repo_folder("org/tiny").exists()


def test_hostile_names_in_a_listing_are_all_refused(online, repo):
    from loracli.hub.hubcache import BadName, check_commit, check_digest, check_rel_path

    for bad in ("", "/etc/passwd", "../x", "a/../../x", "a//b", "a/./b", "a/", "C:/x", "c:x",
                "\\\\host\\share\\x", "a\\..\\..\\x", "nul\x00byte", "tab\there", "x" * 2000):
        try:
            check_rel_path(bad)
        except BadName:
            continue
        raise AssertionError(f"{bad!r} was accepted")
    assert check_rel_path("unet/diffusion_pytorch_model.safetensors")
    for bad in ("a" * 39, "g" * 40, "a" * 41, ESCAPE_COMMIT, None):
        try:
            check_commit(bad)
        except BadName:
            continue
        raise AssertionError(f"{bad!r} was accepted as a commit")
    assert check_digest("A" * 64) == "a" * 64 and check_digest("b" * 40) == "b" * 40


def test_the_token_a_hub_echoes_is_never_printed(cli, online, repo, monkeypatch):
    secret = "hf_EchoedS3cretTokenValue"
    monkeypatch.setenv("HF_TOKEN", secret)
    with serve({"org/tiny": repo}, faults=[Fault("echo", status=403, times=0)]) as url:
        listing = cli("fetch", "org/tiny", "--mirror", url, "--strict", "--json")
        assert listing.exit_code == 1
        assert any(r["authorization"] == f"Bearer {secret}" for r in url.log)  # it was sent, and echoed
        tested = cli("mirror", "test", url, "--model", "org/tiny", "--json")
    with serve({"org/tiny": repo}) as good:
        assert cli("fetch", "org/tiny", "--mirror", good, "--strict").exit_code == 0
    with serve({"org/tiny": repo}, faults=[Fault("echo", status=500, times=0)]) as url:
        synced = cli("mirror", "sync", "--mirror", url, "--strict", "--json")
        assert synced.exit_code == 1
    for r in (listing, tested, synced):
        assert "you sent Bearer ***" in r.stdout + r.stderr  # the message is there, the token not
        assert secret not in r.stdout + r.stderr
    assert secret not in json.dumps(sync.load_status())


def test_every_path_written_resolves_inside_the_cache(isolated):
    """A folder on the way that links out of the cache (left by anything) is never written through."""
    import pytest

    from loracli.hub import hubcache

    outside = _outside(isolated)
    repo_dir = models.repo_folder("org/tiny")
    commit, digest = "c" * 40, "d" * 64
    (repo_dir / "blobs").mkdir(parents=True)
    (repo_dir / "blobs" / digest).write_bytes(b"weights")
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "snapshots" / commit / "unet").symlink_to(outside, target_is_directory=True)
    with pytest.raises(hubcache.BadName, match="resolves outside"):
        hubcache.link_into_snapshot(repo_dir, commit, "unet/config.json", digest)
    assert _files(outside) == {}
    assert hubcache.link_into_snapshot(repo_dir, commit, "vae/config.json", digest).read_bytes() == b"weights"


def test_a_revision_that_leaves_the_refs_folder_is_refused(cli, online):
    r = cli("fetch", "org/tiny@../../../outside", "--mirror", "http://127.0.0.1:9")
    assert r.exit_code == 1 and "refusing revision '../../../outside'" in r.stderr
    assert "hint: lora fetch org/tiny" in r.stderr


def test_a_paged_file_list_naming_the_upstream_host_is_read_from_the_mirror(cli, online, repo,
                                                                              monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NeverLeavesTheMirror")
    # a mirror that copies huggingface.co's Link headers: the next pages are asked of the mirror
    faults = [Fault("pages", value="https://huggingface.co", times=0)]
    with serve({"org/tiny": repo}, faults=faults) as url:
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict", "--json")
        pages = [e["path"] for e in url.log if "/tree/" in e["path"]]
    assert r.exit_code == 0, r.stderr
    assert len(pages) >= 2 and any("cursor=" in p for p in pages)
    with serve({"org/tiny": repo}) as plain:  # the same model listed in one page
        whole = cli("fetch", "org/tiny", "--mirror", plain, "--strict", "--dry-run", "--json")
    expected = {f["path"] for f in json.loads(whole.stdout)["files"]}
    assert {f["path"] for f in json.loads(r.stdout)["files"]} == expected and len(expected) > 2


def test_a_file_list_whose_pages_repeat_is_refused(cli, online, repo):
    loop = Fault("link", times=0)
    with serve({"org/tiny": repo}, faults=[loop]) as url:
        commit = json.loads(cli("fetch", "org/tiny", "--mirror", url, "--dry-run", "--json",
                                "--strict").stdout or "{}").get("commit")
        loop.value = f"{url}/api/models/org/tiny/tree/{commit}?recursive=true&expand=false"
        r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
    assert r.exit_code == 1 and "pages never end" in r.stderr and "internal error" not in r.stderr


def test_a_next_page_on_another_server_is_not_followed(cli, online, repo, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_NeverLeavesTheMirror")
    with serve({}) as elsewhere:
        with serve({"org/tiny": repo}, faults=[Fault("link", value=f"{elsewhere}/steal")]) as url:
            r = cli("fetch", "org/tiny", "--mirror", url, "--strict")
        assert elsewhere.log == []  # neither asked nor given the token
    _refused_cleanly(r)
    assert "the next page of the file list is on another server" in r.stderr
