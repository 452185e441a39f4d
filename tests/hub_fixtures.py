"""Fixtures shared by the hub, mirror and cache tests: small repos on disk, a loopback-only setup."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loracli import settings

ROOT = Path(__file__).resolve().parents[1]


def make_repo(folder: Path, weights: int = 200_000, seed: int = 0) -> Path:
    """A small diffusers-shaped repo: JSON configs (git-oid files) and safetensors-named LFS files."""
    import random

    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for comp in ("unet", "vae"):
        (folder / comp).mkdir(exist_ok=True)
        (folder / comp / "config.json").write_text(json.dumps({"component": comp}))
        (folder / comp / "diffusion_pytorch_model.safetensors").write_bytes(rnd.randbytes(weights))
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(rnd.randbytes(weights // 2))
    (folder / "v1-5-pruned.safetensors").write_bytes(rnd.randbytes(1000))
    vocab = json.dumps({f"tok{i}": i for i in range(3000)})  # identical in both: one blob
    for tok in ("tokenizer", "tokenizer_2"):
        (folder / tok).mkdir(exist_ok=True)
        (folder / tok / "vocab.json").write_text(vocab)
    return folder


@pytest.fixture
def online(monkeypatch):
    """The hub code may talk to 127.0.0.1; no fallback to the real internet mirrors."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    settings.save({"mirror_order": []})


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "upstream" / "org-tiny")


def lora_env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("HF_HUB_OFFLINE", None)
    env.update(extra)
    return env


def lora_proc(*args, **extra) -> subprocess.Popen:
    """`lora ARGS…` as a real process (stdout/stderr captured)."""
    return subprocess.Popen([sys.executable, "-m", "loracli", *map(str, args)], cwd=ROOT,
                            env=lora_env(**extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def blobs(cache: Path, repo_id: str = "org/tiny") -> list[Path]:
    d = cache / ("models--" + repo_id.replace("/", "--")) / "blobs"
    return sorted(d.iterdir()) if d.is_dir() else []


def unique_bytes(folder: Path) -> int:
    """Bytes a fetch of make_repo's repo transfers: each distinct content once, no fp16 variant."""
    seen = {p.read_bytes() for p in folder.rglob("*") if p.is_file() and ".fp16." not in p.name}
    return sum(len(b) for b in seen)
