"""`$LORA_HOME/config.toml`: user settings such as the default mirror and user-defined mirrors.

    default_mirror = "hf-mirror"
    fallbacks = ["hf-mirror", "hf"]
    [mirrors.company]
    url = "https://hf.example.internal"
    kind = "hub"
"""

from __future__ import annotations

import sys
from typing import Callable

from loracli import atomic, paths
from loracli.errors import LoraError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load() -> dict:
    """The settings as a dict ({} when there is no config file yet)."""
    from loracli.profiles import decode

    path = paths.config_file()
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(decode(path.read_bytes(), str(path)))
    except tomllib.TOMLDecodeError as e:
        raise LoraError(f"{path}: invalid TOML: {e}",
                        "fix that line, or move the file away to start from defaults") from None


def save(data: dict) -> None:
    import tomli_w

    atomic.write_text(paths.config_file(), tomli_w.dumps(data))


def update(change: Callable[[dict], None]) -> dict:
    """Read, change and atomically write the settings; returns the new settings."""
    data = load()
    change(data)
    save(data)
    return data
