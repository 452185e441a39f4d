"""What `lora doctor` reports: versions, devices, accelerate config, cache and disk, mirror."""

from __future__ import annotations

import os
import platform
import shutil
import sys
from importlib import metadata
from pathlib import Path

from loracli import __version__, paths, settings

PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate",
            "safetensors", "huggingface_hub", "open_clip_torch", "typer", "rich")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> dict:
    try:
        import torch
    except Exception as e:  # a broken torch install is exactly what doctor must report
        return {"cuda": False, "mps": False, "error": f"{type(e).__name__}: {e}"}
    cuda = torch.cuda.is_available()
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    best = "cuda" if cuda else "mps" if mps else "cpu"
    return {"cuda": cuda, "gpus": names, "mps": mps, "training_device": best,
            "cpu_threads": torch.get_num_threads()}


def _accelerate_config() -> str:
    env = os.environ.get("ACCELERATE_CONFIG_FILE")
    if env:
        return env
    base = os.environ.get("HF_HOME") and Path(os.environ["HF_HOME"])
    path = (base or paths.hf_home()) / "accelerate" / "default_config.yaml"
    return str(path) if path.is_file() else "none (single process, or `accelerate config`)"


def _disk(path: Path) -> dict:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "free_gb": round(usage.free / 1e9, 1)}


def _mirror(config: dict) -> str:
    from loracli.hub import mirrors

    try:
        m = mirrors.get(mirrors.default_name(config))
    except Exception as e:  # a broken mirror setting is what doctor must report
        return f"{mirrors.default_name(config)} ({e})"
    return f"{m.name} ({m.url}, {m.kind})" if m.name != m.url else m.url


def collect() -> dict:
    config = settings.load()
    return {
        "lora": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in PACKAGES},
        "device": _devices(),
        "accelerate_config": _accelerate_config(),
        "home": str(paths.home()),
        "cache": _disk(paths.cache_dir()),
        "default_mirror": _mirror(config),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE", "0"),
    }
