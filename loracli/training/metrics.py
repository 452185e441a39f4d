"""`logs/metrics.jsonl`: one JSON line per optimizer step, continued across resumes.

    {"step", "max_steps", "epoch", "loss", "loss_smooth", "lr", "seconds", "images_per_s",
     "memory_mib", "elapsed"}

A resumed run drops the lines a killed run logged after its last checkpoint (they are redone) and
carries the smoothed loss and the elapsed training time on from that checkpoint, so the log (and
`loss.png`) reads as one run. Only the main process writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from loracli import atomic

SMOOTHING = 0.9  # exponential moving average of the loss


def path(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / "metrics.jsonl"


def trim(file: Path, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint; they will be redone."""
    if not file.is_file():
        return
    keep = []
    for line in file.read_text("utf-8").splitlines():
        try:
            if line.strip() and json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue  # a line cut short by a crash
    atomic.write_text(file, "".join(line + "\n" for line in keep))


def memory_mib(device) -> float:
    """Peak memory in MiB: CUDA allocator peak on a GPU, the process's peak RSS otherwise."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:  # Linux: this process's own high-water mark (ru_maxrss can carry a parent's over exec)
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class Log:
    """The run's metrics: `row(...)` makes a step's line; `write` appends it (main process)."""

    def __init__(self, run_dir: Path, start_step: int, saved: dict, main: bool):
        self.file = path(run_dir)
        self.smooth = saved.get("loss_smooth")   # carried on from the checkpoint, if any
        self.elapsed_before = saved.get("elapsed", 0.0)
        self.started = time.perf_counter()
        self.out = None
        if main:
            trim(self.file, start_step)
            self.file.parent.mkdir(parents=True, exist_ok=True)
            self.out = open(self.file, "a", encoding="utf-8")

    def elapsed(self) -> float:
        return round(self.elapsed_before + time.perf_counter() - self.started, 3)

    def row(self, step: int, max_steps: int, epoch: float, loss: float, lr: float,
            seconds: float, images: int, device) -> dict:
        self.smooth = loss if self.smooth is None else \
            SMOOTHING * self.smooth + (1 - SMOOTHING) * loss
        return {"step": step, "max_steps": max_steps, "epoch": round(epoch, 4), "loss": loss,
                "loss_smooth": self.smooth, "lr": lr, "seconds": round(seconds, 4),
                "images_per_s": round(images / seconds, 3),
                "memory_mib": round(memory_mib(device), 1), "elapsed": self.elapsed()}

    def write(self, row: dict) -> None:
        if self.out is not None:
            self.out.write(json.dumps(row) + "\n")
            self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


# ---------------------------------------------------------------- TensorBoard / W&B (optional)

TRACKERS = ("tensorboard", "wandb")


def tracker(train) -> str | None:
    """`train.log_with` checked: None, "tensorboard" or "wandb" (its package installed)."""
    from importlib.util import find_spec

    from loracli.errors import LoraError

    kind = train.log_with or None
    if kind is None:
        return None
    if kind not in TRACKERS:
        raise LoraError(f"train.log_with: {kind!r} is not one of tensorboard, wandb",
                        "set train.log_with = \"tensorboard\", \"wandb\" or \"\" (metrics.jsonl "
                        "and loss.png only)")
    if kind == "tensorboard" and not (find_spec("tensorboard") or find_spec("tensorboardX")):
        raise LoraError("train.log_with = \"tensorboard\" needs the tensorboard package",
                        "pip install tensorboard, or set train.log_with = \"\"")
    if kind == "wandb" and not find_spec("wandb"):
        raise LoraError("train.log_with = \"wandb\" needs the wandb package and a login",
                        "pip install wandb && wandb login, or set train.log_with = \"\"")
    return kind


def start_tracker(accelerator, kind: str, run_dir: Path, profile) -> None:
    """TensorBoard event files go to <run>/logs/tensorboard; a W&B run keeps one id across
    resumes (project "lora", named after the profile)."""
    import hashlib

    config = {f"{section}.{key}": value if isinstance(value, (int, float, str, bool)) else str(value)
              for section, keys in profile.to_dict().items() for key, value in keys.items()}
    run_id = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    accelerator.init_trackers(
        "tensorboard" if kind == "tensorboard" else "lora", config=config,
        init_kwargs={"wandb": {"name": profile.name, "id": run_id, "resume": "allow",
                               "dir": str(Path(run_dir) / "logs")}})


TRACKED = ("loss", "loss_smooth", "lr", "epoch", "images_per_s")


def track(accelerator, row: dict) -> None:
    accelerator.log({k: row[k] for k in TRACKED}, step=row["step"])


def track_samples(accelerator, paths: list, step: int) -> None:
    """Sample images beside the scalars (every sample of a step has the same size)."""
    if not paths:
        return
    import numpy as np
    from PIL import Image

    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    for t in accelerator.trackers:
        if t.name == "tensorboard":
            t.log_images({"samples": np.stack(images)}, step, dataformats="NHWC")
        else:
            t.log_images({"samples": images}, step)
