"""Shell completion values: profile names, models, mirrors, runs and LoRA files.

Each function takes what the user typed so far and returns the candidates. They read a few
folders and small TOML/JSON files and import nothing heavy (no torch, no huggingface_hub): a
<TAB> must answer at once. A completer never raises; it returns what it could find.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Callable

LIMIT = 500  # entries looked at per folder: a <TAB> in a huge folder must still answer at once


def _quiet(function: Callable[[str], list[str]]) -> Callable[[str], list[str]]:
    def complete(incomplete: str = "") -> list[str]:
        try:
            return sorted(dict.fromkeys(c for c in function(incomplete) if c.startswith(incomplete)))
        except Exception:  # noqa: BLE001 - a broken setting must not break the shell
            return []

    complete.__name__ = function.__name__
    complete.__doc__ = function.__doc__
    return complete


@_quiet
def profile_names(incomplete: str) -> list[str]:
    """Built-in presets and your profiles."""
    from loracli import profiles

    return profiles.names()


def _cached_repos() -> list[str]:
    from loracli import paths

    cache = paths.cache_dir()
    if not cache.is_dir():
        return []
    return [d.name[len("models--"):].replace("--", "/", 1) for d in cache.iterdir()
            if d.name.startswith("models--") and (d / "snapshots").is_dir()]


@_quiet
def cached_models(incomplete: str) -> list[str]:
    """Models in the cache: the alias where one fits (sd15), else org/name."""
    from loracli.hub import models as names

    by_repo = {a.repo_id: alias for alias, a in names.ALIASES.items()}
    return [by_repo.get(repo, repo) for repo in _cached_repos()]


@_quiet
def models(incomplete: str) -> list[str]:
    """Model aliases (sd15, sdxl, …) and the models already in the cache."""
    from loracli.hub import models as names

    return names.names()


@_quiet
def mirrors(incomplete: str) -> list[str]:
    """Built-in and your mirrors."""
    from loracli.hub import mirrors as known

    return list(known.all_mirrors())


def _run_folders(incomplete: str) -> list[Path]:
    """Run folders (with a run.json) under the folder being typed, two levels deep."""
    typed = Path(os.path.expanduser(incomplete))
    base = typed if incomplete.endswith(("/", os.sep)) else typed.parent
    found = []
    if base.is_dir():
        children = [c for c in itertools.islice(base.iterdir(), LIMIT)
                    if c.is_dir() and not c.name.startswith(".")]
        for child in children:
            if (child / "run.json").is_file():
                found.append(child)
            elif os.access(child, os.R_OK | os.X_OK):
                found += [g for g in itertools.islice(child.iterdir(), LIMIT)
                          if (g / "run.json").is_file()]
    return found


def _shown(path: Path, incomplete: str) -> str:
    text = str(path)
    if incomplete.startswith("./") and not text.startswith("./"):
        text = "./" + text
    return text


def _profiles_with_runs() -> list[str]:
    from loracli import profiles

    named = []
    for name in profiles.names():
        try:
            template = profiles.load(name).train.output_dir
        except Exception:  # noqa: BLE001 - a broken profile simply has no run to offer
            continue
        if (Path(template.format(profile=name)).expanduser() / "run.json").is_file():
            named.append(name)
    return named


@_quiet
def runs(incomplete: str) -> list[str]:
    """Run folders (output/anime) and the profile names that have a run."""
    return [_shown(p, incomplete) for p in _run_folders(incomplete)] + _profiles_with_runs()


@_quiet
def lora_files(incomplete: str) -> list[str]:
    """LoRA files: .safetensors files being typed, and those exported inside run folders."""
    typed = Path(os.path.expanduser(incomplete))
    base = typed if incomplete.endswith(("/", os.sep)) else typed.parent
    files = list(base.glob("*.safetensors")) if base.is_dir() else []
    for run in _run_folders(incomplete):
        files += run.glob("*.safetensors")
    dirs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")] \
        if base.is_dir() else []
    return [_shown(f, incomplete) for f in files] + [_shown(d, incomplete) + "/" for d in dirs]


def shells(incomplete: str = "") -> list[str]:
    return [s for s in ("bash", "zsh", "fish") if s.startswith(incomplete)]
