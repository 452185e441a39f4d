"""Checkpoint writing without a model: atomicity, pruning, disk checks, Ctrl+C handling."""

from __future__ import annotations

import errno
import json
import os
import signal
from collections import namedtuple

import pytest

from loracli.errors import LoraError
from loracli.training import checkpoints
from loracli.training import loop as training
from loracli.training import runs

Usage = namedtuple("Usage", "total used free")


class Config:  # the part of peft's LoraConfig that checkpoints.save uses
    def to_dict(self):
        return {"r": 4, "lora_alpha": 8, "target_modules": {"to_q", "to_k"}}


def _save(run, step, keep=3):
    import torch

    sd = {"a.lora_A.weight": torch.full((4, 8), float(step)), "a.lora_B.weight": torch.zeros(8, 4)}
    optimizer = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.ones(4, 8)}},
                 "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "params": [0]}]}
    trainer = {"optimizer": optimizer, "scheduler": {"last_epoch": step, "_last_lr": [1e-4]},
               "rng": {"torch": torch.get_rng_state()}}
    return checkpoints.save(run, step, {"unet": (sd, Config())}, trainer, {"epoch": 0}, keep)


def test_save_writes_the_contract_layout_and_load_reads_it_back(tmp_path):
    path = _save(tmp_path, 5)
    assert path == runs.checkpoint_dir(tmp_path, 5) and runs.verify(path) is None
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 5 and state["epoch"] == 0
    assert set(state["files"]) == {"unet/adapter_model.safetensors", "unet/adapter_config.json",
                                   "optimizer.json", "optimizer.safetensors", "scheduler.json",
                                   "rng.json", "rng.safetensors"}
    assert not list(path.rglob("*.pt")) and state["format"] == 2
    config = json.loads((path / "unet" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["to_k", "to_q"] and config["lora_alpha"] == 8
    loaded = checkpoints.load(path)
    assert loaded["adapters"]["unet"]["a.lora_A.weight"][0, 0] == 5.0
    assert loaded["optimizer"]["state"][0]["step"].item() == 5.0
    assert loaded["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert loaded["scheduler"] == {"last_epoch": 5, "_last_lr": [1e-4]}
    import torch

    assert torch.equal(loaded["rng"]["torch"], torch.get_rng_state())


def test_keeps_the_newest_n_and_never_the_only_complete_one(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep=2)
    assert [c.step for c in runs.checkpoints(tmp_path)] == [3, 4]
    # a broken newer checkpoint does not count: the newest complete one survives
    broken = runs.checkpoint_dir(tmp_path, 9)
    broken.mkdir()
    _save(tmp_path, 5, keep=1)
    assert [(c.step, c.complete) for c in runs.checkpoints(tmp_path)] == [(5, True), (9, False)]
    assert checkpoints.prune(tmp_path, 1) == []


def test_interrupted_save_leaves_nothing_trusted_and_the_next_save_cleans_up(tmp_path, monkeypatch):
    _save(tmp_path, 2)
    calls = []
    real = checkpoints._fsynced

    def second_ctrl_c(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what a second Ctrl+C raises while saving
        real(path, data)

    monkeypatch.setattr(checkpoints, "_fsynced", second_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 4)
    monkeypatch.setattr(checkpoints, "_fsynced", real)
    assert [c.step for c in runs.checkpoints(tmp_path)] == [2]
    assert runs.latest(tmp_path).step == 2
    assert (tmp_path / "checkpoints" / ".step-000004.partial").is_dir()
    _save(tmp_path, 4)
    assert not (tmp_path / "checkpoints" / ".step-000004.partial").exists()
    assert runs.latest(tmp_path).step == 4


def test_resaving_a_step_replaces_it_atomically(tmp_path):
    _save(tmp_path, 3)
    _save(tmp_path, 3)
    assert [c.step for c in runs.checkpoints(tmp_path)] == [3]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda p: Usage(10**9, 10**9, 10 << 20))
    with pytest.raises(LoraError, match="not enough disk space") as e:
        _save(tmp_path, 1)
    assert "keep_checkpoints" in e.value.hint
    assert runs.checkpoints(tmp_path) == []


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "free at least"),
                                          (errno.EACCES, "writable")])
def test_a_write_error_while_saving_keeps_the_last_checkpoint_and_says_what_to_do(
        tmp_path, monkeypatch, code, words):
    _save(tmp_path, 2)
    real, calls = checkpoints._fsynced, []

    def failing(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(code, os.strerror(code), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoints, "_fsynced", failing)
    with pytest.raises(LoraError) as e:
        _save(tmp_path, 4)
    assert "checkpoint step-000004" in e.value.message and words in e.value.hint
    assert f"lora resume {tmp_path}" in e.value.hint
    assert runs.latest(tmp_path).step == 2 and checkpoints.load(runs.latest(tmp_path).path)
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]


def test_first_ctrl_c_asks_to_stop_the_second_aborts():
    stop = training.StopFlag()
    notes = []
    before = signal.getsignal(signal.SIGINT)
    with stop.installed(notes.append):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and "saving a checkpoint" in notes[0]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_changed_keys_lists_each_difference():
    from loracli import profiles

    a = profiles.load("default")
    b = profiles.load("default", ["train.learning_rate=0.001", "lora.rank=4"])
    assert runs.changed_keys(a, b) == ["lora.rank: 8 → 4", "train.learning_rate: 0.0002 → 0.001"]
