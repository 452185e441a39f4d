"""Where things live. Every function reads the environment when called, never at import time,
so each test can point `LORA_HOME`/`LORA_CACHE`/`HF_HOME` at its own `tmp_path`."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Settings, profiles and (when set) state: `$LORA_HOME`, else the platform's config dir."""
    env = os.environ.get("LORA_HOME")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("lora", appauthor=False))


def config_file() -> Path:
    return home() / "config.toml"


def profiles_dir() -> Path:
    return home() / "profiles"


def state_dir() -> Path:
    """Sync status, tracked models, locks: `$LORA_HOME/state`, else the platform's state dir."""
    if os.environ.get("LORA_HOME"):
        return home() / "state"
    import platformdirs

    return Path(platformdirs.user_state_dir("lora", appauthor=False))


def hf_home() -> Path:
    env = os.environ.get("HF_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface"


def cache_dir() -> Path:
    """The model cache shared by every command, in the Hugging Face hub cache layout.

    `$LORA_CACHE`, else Hugging Face's own hub cache (`HF_HUB_CACHE`, `HF_HOME/hub`), so that
    diffusers, transformers and open_clip reuse what `lora fetch` downloads.
    """
    for var in ("LORA_CACHE", "HF_HUB_CACHE"):
        env = os.environ.get(var)
        if env:
            return Path(env).expanduser()
    return hf_home() / "hub"
