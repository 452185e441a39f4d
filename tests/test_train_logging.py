"""`[train] log_with`: the metrics a run writes to metrics.jsonl also reach TensorBoard (local
event files under the run) when asked; nothing is logged elsewhere when not; an unknown or
uninstalled tracker is a plain error before any training."""

from __future__ import annotations

import json
import struct
import types

import pytest
from train_fixtures import make_dataset, write_profile

from loracli import profiles
from loracli.errors import LoraError
from loracli.training import loop as training
from loracli.training import metrics, runs

pytestmark = pytest.mark.slow


def _scalars(folder) -> dict:
    """{tag: [(step, value)]} from TensorBoard event files, read as TFRecords of Event protos."""
    from tensorboardX.proto import event_pb2

    out: dict = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        data = f.read_bytes()
        i = 0
        while i < len(data):
            (length,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
            i += 12 + length + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_tensorboard_gets_the_same_metrics_as_metrics_jsonl(tiny_sd, tmp_path):
    pytest.importorskip("tensorboardX")
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "tb.toml", tiny_sd, data, tmp_path / "run",
                         train={"max_steps": 3, "save_steps": 3, "log_with": "tensorboard"})
    run_dir, _ = runs.start(profiles.load(str(path)))
    assert training.run(run_dir).status == "finished"
    rows = [json.loads(x) for x in (run_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    scalars = _scalars(run_dir / "logs" / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss"]] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    assert [v for _, v in scalars["lr"]] == pytest.approx([r["lr"] for r in rows], rel=1e-6)


def test_no_tracker_unless_asked_and_a_clear_error_for_a_wrong_one(tiny_sd, tmp_path, monkeypatch):
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "p.toml", tiny_sd, data, tmp_path / "run",
                         train={"max_steps": 1, "save_steps": 1})
    run_dir, _ = runs.start(profiles.load(str(path)))
    assert training.run(run_dir).status == "finished"
    assert not (run_dir / "logs" / "tensorboard").exists()
    with pytest.raises(LoraError, match="not one of tensorboard, wandb") as e:
        metrics.tracker(types.SimpleNamespace(log_with="mlflow"))
    assert "train.log_with" in e.value.hint
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(LoraError, match="needs the wandb package") as e:
        metrics.tracker(types.SimpleNamespace(log_with="wandb"))
    assert "pip install wandb" in e.value.hint
