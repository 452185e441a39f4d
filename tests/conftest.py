"""Shared fixtures: every test gets its own LORA_HOME/LORA_CACHE/HF_HOME with the hub offline;
tiny models are built once per session, offline and deterministically (loracli.tiny)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

HERMETIC = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_DISABLE_XET": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "NO_COLOR": "1",
}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Point every lora/Hugging Face location at tmp_path; nothing leaks between tests."""
    home = tmp_path / "lora-home"
    cache = tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("LORA_HOME", str(home))
    monkeypatch.setenv("LORA_CACHE", str(cache))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_CACHE", "HF_ENDPOINT", "HF_TOKEN", "LORA_MIRROR", "LORA_DEBUG",
                "VISUAL", "EDITOR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    for var, value in HERMETIC.items():
        monkeypatch.setenv(var, value)
    return {"home": home, "cache": cache, "tmp": tmp_path}


@pytest.fixture
def cli():
    """Run `lora ARGS…` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from loracli.cli import app

    runner = CliRunner()

    def run(*args, input=None, env=None):
        return runner.invoke(app, [str(a) for a in args], input=input, env=env,
                             catch_exceptions=False)

    return run


def _built(tmp_path_factory, key: str, build) -> Path:
    root = tmp_path_factory.getbasetemp() / "tiny-models"
    path = root / key
    if not (path / ".built").exists():
        shutil.rmtree(path, ignore_errors=True)
        build(path)
        (path / ".built").write_text("ok")
    return path


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD1-shaped diffusers pipeline folder (real CLIP tokenizer, 8x VAE, 64 px)."""
    from loracli import tiny

    return _built(tmp_path_factory, "sd1", lambda p: tiny.build_tiny_sd(p, "sd1"))


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    """A tiny SD2-shaped pipeline (linear projections, v-prediction scheduler)."""
    from loracli import tiny

    return _built(tmp_path_factory, "sd2", lambda p: tiny.build_tiny_sd(p, "sd2"))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-shaped pipeline (two text encoders, text_time conditioning, SDXL block layout)."""
    from loracli import tiny

    return _built(tmp_path_factory, "sdxl", lambda p: tiny.build_tiny_sd(p, "sdxl"))


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory) -> Path:
    """A tiny open_clip model as a `local-dir:` folder (random weights, real tokenizer)."""
    from loracli import tiny

    return _built(tmp_path_factory, "open_clip", tiny.build_tiny_open_clip)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
