"""A run folder is data, never code: `lora resume` of a shared or downloaded run unpickles
nothing, even when its state.json vouches for the pickle; old pickled checkpoints are refused with
the way out; a write error while saving is a plain error that keeps the last checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
from train_fixtures import make_dataset, write_profile

from loracli import profiles
from loracli.hashing import sha256_file
from loracli.training import checkpoints
from loracli.training import loop as training
from loracli.training import runs

pytestmark = pytest.mark.slow


class _Payload:
    """Unpickling this creates `marker`: what a hostile optimizer.pt would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_to(path, marker):
    import torch

    torch.save({"state": _Payload(marker)}, path)


@pytest.fixture(scope="module")
def trained(tiny_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("security")
    data = make_dataset(root / "data", n=2)
    path = write_profile(root / "safe.toml", tiny_sd, data, root / "run",
                         train={"max_steps": 2, "save_steps": 2})
    run_dir, _ = runs.start(profiles.load(str(path)))
    assert training.run(run_dir).status == "finished"
    return {"root": root, "run": run_dir, "profile": path}


def _copy(trained, tmp_path):
    copy = tmp_path / "shared-run"
    shutil.copytree(trained["run"], copy)
    return copy, runs.latest(copy).path


def _vouch(ckpt, names, drop=()):
    """Rewrite state.json so its sha256 list covers `names` (as whoever wrote the folder can)."""
    state = json.loads((ckpt / "state.json").read_text())
    for name in drop:
        state["files"].pop(name, None)
        (ckpt / name).unlink(missing_ok=True)
    for name in names:
        state["files"][name] = sha256_file(ckpt / name)
    (ckpt / "state.json").write_text(json.dumps(state))


def test_the_payload_really_runs_when_unpickled(tmp_path):
    import torch

    _pickle_to(tmp_path / "probe.pt", tmp_path / "probe-marker")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert (tmp_path / "probe-marker").exists()  # so the assertions below can fail


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_an_old_pickled_checkpoint_is_refused_without_loading_it(trained, tmp_path, cli, name):
    copy, ckpt = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    _pickle_to(ckpt / name, marker)
    part = name.removesuffix(".pt")
    _vouch(ckpt, [name], drop=[f"{part}.json", f"{part}.safetensors"])
    assert runs.verify(ckpt) is None  # the hashes match: only the format gives it away

    result = cli("resume", copy)
    assert not marker.exists()
    assert result.exit_code == 1, result.stderr
    assert "error:" in result.stderr and "older lora" in result.stderr
    assert "internal error" not in result.stderr
    assert "--restart" in result.stderr and f"lora export {copy}" in result.stderr


def test_a_pickle_under_a_safetensors_name_is_not_loaded(trained, tmp_path, cli):
    copy, ckpt = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    _pickle_to(ckpt / "optimizer.safetensors", marker)
    _vouch(ckpt, ["optimizer.safetensors"])
    result = cli("resume", copy)
    assert result.exit_code == 1 and not marker.exists()
    assert "optimizer state cannot be read" in result.stderr and "hint:" in result.stderr


def test_an_old_format_run_still_exports(trained, tmp_path, cli):
    copy, ckpt = _copy(trained, tmp_path)
    for part in ("optimizer", "scheduler", "rng"):
        (ckpt / f"{part}.pt").write_bytes(b"not loaded")
    _vouch(ckpt, ["optimizer.pt", "scheduler.pt", "rng.pt"],
           drop=["optimizer.json", "optimizer.safetensors", "scheduler.json", "rng.json",
                 "rng.safetensors"])
    out = tmp_path / "old.safetensors"
    result = cli("export", copy, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size > 0


def test_a_full_disk_while_saving_keeps_the_last_checkpoint(trained, tmp_path, cli, monkeypatch):
    copy, _ = _copy(trained, tmp_path)
    real = checkpoints._fsynced

    def full(path, data):
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoints, "_fsynced", full)
    result = cli("resume", copy, "--until-step", "4")
    assert result.exit_code == 1
    assert "error: no space left while writing checkpoint step-000004" in result.stderr
    assert "hint: free at least" in result.stderr and "internal error" not in result.stderr
    assert runs.latest(copy).step == 2
    assert not [p for p in (copy / "checkpoints").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(checkpoints, "_fsynced", real)
    assert cli("resume", copy, "--until-step", "4").exit_code == 0  # space freed: it goes on
    assert runs.latest(copy).step == 4
