"""Helpers for the training and resume tests: a learnable synthetic dataset, profiles, a network
guard and subprocess runs of the real `lora` command."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw


def make_dataset(folder: Path, n: int = 6, seed: int = 0) -> Path:
    """A learnable concept: a red square on a blue background, 64 px, captioned tags."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (20, 40, 200))
        x, y = rnd.randint(0, 32), rnd.randint(0, 32)
        ImageDraw.Draw(im).rectangle([x, y, x + 24, y + 24], fill=(230, 30, 30))
        im.save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("sks, red square, blue background", "utf-8")
    return folder


def write_profile(path: Path, base_model, data_dir: Path, out_dir: Path, **sections) -> Path:
    """A profile TOML: tiny defaults for the tests, `sections={"train": {...}}` override them."""
    merged = {
        "model": {"base": str(base_model)},
        "data": {"dir": str(data_dir), "resolution": 64},
        "lora": {"rank": 4, "alpha": 4, "dropout": 0.0},
        "train": {"max_steps": 4, "batch_size": 2, "save_steps": 2, "learning_rate": 1e-3,
                  "mixed_precision": "no", "output_dir": str(out_dir)},
    }
    for section, values in sections.items():
        merged.setdefault(section, {}).update(values)
    import tomli_w

    path.write_text(tomli_w.dumps(merged), "utf-8")
    return path


class NetworkGuard:
    """Refuses (and records) every connection that is not to loopback or a Unix socket."""

    def __init__(self):
        self.attempts: list = []

    def _check(self, address):
        if isinstance(address, (str, bytes)):
            return  # AF_UNIX
        host = address[0]
        try:
            if ipaddress.ip_address(host).is_loopback:
                return
        except ValueError:
            if host == "localhost":
                return
        self.attempts.append(address)
        raise OSError(f"network guard: connection to {address} refused in a test")

    @contextlib.contextmanager
    def active(self):
        real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
        guard = self

        def connect(sock, address):
            guard._check(address)
            return real_connect(sock, address)

        def connect_ex(sock, address):
            guard._check(address)
            return real_connect_ex(sock, address)

        socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
        try:
            yield self
        finally:
            socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex


def lora_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "loracli", *map(str, args)]


def env(**extra) -> dict:
    out = dict(os.environ)
    out.update({k: str(v) for k, v in extra.items()})
    return out


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(0.01)
    return False


def metrics_steps(run_dir: Path) -> list[int]:
    import json

    path = run_dir / "logs" / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text("utf-8").splitlines():
        with contextlib.suppress(ValueError):
            steps.append(json.loads(line)["step"])
    return steps


def adapter_tensors(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return {f"{c.name}/{k}": v for c in sorted(ckpt.iterdir()) if c.is_dir()
            for k, v in load_file(str(c / "adapter_model.safetensors")).items()}
