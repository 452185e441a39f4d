"""Shared fixtures: every test gets its own LORA_HOME/LORA_CACHE/HF_HOME with the hub offline;
tiny models are built once per session, offline and deterministically (loracli.tiny)."""

from __future__ import annotations

import shutil
import sys
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
    """Run `lora ARGS…` in-process through `loracli.cli.run`, the same path as the console
    script (its error table included); returns a Result (exit_code, stdout, stderr)."""
    from typer.testing import Result

    from loracli.cli import run as lora

    runner = CliRunner()

    def run(*args, input=None, env=None):
        with runner.isolation(input=input, env=env) as (out, err, mixed):
            try:
                code = lora([str(a) for a in args])
            except SystemExit as e:  # shell completion and eager options exit by themselves
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            return Result(runner, out.getvalue(), err.getvalue(), mixed.getvalue(), None,
                          code, None)

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
