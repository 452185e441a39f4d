"""Writing and reading checkpoints in the layout `loracli.runs` documents.

A checkpoint is written into `checkpoints/.step-NNNNNN.partial/`, every file fsynced, `state.json`
(with the sha256 of every other file) next, `COMPLETE` last, and only then renamed to
`step-NNNNNN/`. A process killed at any point leaves either the previous checkpoints untouched
plus a `.partial` folder that nothing trusts (and the next save removes), or a whole checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
from pathlib import Path

from loracli import atomic, runs
from loracli.errors import LoraError

TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")
MARGIN = 64 << 20  # keep this much disk free beyond the checkpoint itself


def _tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))


def estimate_size(adapters: dict, optimizer_state_bytes: int) -> int:
    return sum(_tensor_bytes(sd) for sd, _ in adapters.values()) + optimizer_state_bytes + (1 << 20)


def check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed + MARGIN:
        raise LoraError(
            f"not enough disk space for a checkpoint in {folder}: {free / 2**20:.0f} MiB free, "
            f"{(needed + MARGIN) / 2**20:.0f} MiB needed",
            "free some space (older runs, `lora cache rm …`) or lower train.keep_checkpoints, "
            "then `lora resume` this run")


def _fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove folders an interrupted save left behind (never trusted, never resumed from)."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".step-") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def save(run_dir: Path, step: int, adapters: dict, trainer: dict, state: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically; prune to the newest `keep` complete ones.

    adapters: {component: (peft state dict, LoraConfig)}; trainer: {"optimizer", "scheduler",
    "rng"} objects saved with torch.save; state: JSON facts (step, epoch, data position…).
    """
    from safetensors.torch import save as st_save

    run_dir = Path(run_dir)
    final = runs.checkpoint_dir(run_dir, step)
    root = final.parent
    clean_partial(run_dir)
    blobs = {name: _torch_bytes(trainer[name.removesuffix(".pt")]) for name in TRAINER_FILES}
    check_disk(root, estimate_size(adapters, sum(len(b) for b in blobs.values())))
    tmp = root / f".{final.name}.partial"
    tmp.mkdir(parents=True)
    files = {}
    for component, (sd, config) in adapters.items():
        (tmp / component).mkdir()
        tensors = {k: v.detach().to("cpu").float().contiguous() for k, v in sd.items()}
        _fsynced(tmp / component / "adapter_model.safetensors",
                 st_save(tensors, metadata={"format": "pt"}))
        _fsynced(tmp / component / "adapter_config.json",
                 json.dumps(_config_dict(config), indent=2, sort_keys=True).encode())
        files[f"{component}/adapter_model.safetensors"] = None
        files[f"{component}/adapter_config.json"] = None
    for name, blob in blobs.items():
        _fsynced(tmp / name, blob)
        files[name] = None
    pause = float(os.environ.get("LORA_TEST_SAVE_PAUSE", "0") or 0)
    if pause:  # fault-injection hook for the crash tests: a window to kill a save mid-way
        time.sleep(pause)
    files = {rel: runs.sha256_file(tmp / rel) for rel in files}
    _fsynced(tmp / "state.json",
             json.dumps({**state, "step": step, "files": files}, indent=2, sort_keys=True).encode())
    for component in adapters:
        atomic.fsync_dir(tmp / component)
    _fsynced(tmp / runs.MARKER, b"")
    atomic.fsync_dir(tmp)
    if final.exists():  # a re-save of the same step (e.g. after a resume); swap it out
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    atomic.fsync_dir(root)
    prune(run_dir, keep)
    return final


def _config_dict(config) -> dict:
    d = config.to_dict()
    out = {}
    for k, v in d.items():
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        elif hasattr(v, "value"):  # enums (peft_type, task_type)
            v = v.value
        out[k] = v
    return out


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and broken ones older than those.

    The newest complete checkpoint is never deleted.
    """
    found = runs.checkpoints(run_dir, deep=False)
    complete = [c for c in found if c.complete]
    keep_set = {c.path for c in complete[-max(1, keep):]}
    newest = complete[-1].step if complete else None
    removed = []
    for c in found:
        stale_broken = not c.complete and newest is not None and c.step < newest
        if (c.complete and c.path not in keep_set) or stale_broken:
            shutil.rmtree(c.path, ignore_errors=True)
            removed.append(c.path)
    return removed


def load(ckpt: Path) -> dict:
    """{"state": state.json, "adapters": {component: state dict}, "optimizer", "scheduler",
    "rng"}."""
    import torch
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    state = json.loads((ckpt / "state.json").read_text("utf-8"))
    adapters = {}
    for rel in state["files"]:
        if rel.endswith("/adapter_model.safetensors"):
            adapters[rel.split("/")[0]] = load_file(str(ckpt / rel))
    out = {"state": state, "adapters": adapters}
    for name in TRAINER_FILES:
        # our own file, its sha256 checked by runs.verify: full unpickling is safe here
        out[name.removesuffix(".pt")] = torch.load(ckpt / name, map_location="cpu",
                                                   weights_only=False)
    return out
