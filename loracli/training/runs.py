"""A run folder: the contract between `train`, `resume` and `export`.

    output/anime/
      profile.toml                 the resolved profile, frozen at start
      run.json                     base model facts: {"base": {...}, "started_at", "lora_version"}
      dataset.json                 {"num_images", "tag_frequency": {folder: {tag: count}}, ...}
      checkpoints/step-000100/     layout, writing and reading: `loracli.training.checkpoints`
      logs/metrics.jsonl, loss.png, samples/

The checkpoint names below are re-exported from `loracli.training.checkpoints`, their one home, for the
callers that know a run rather than a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError
from loracli.hashing import sha256_file  # noqa: F401 (sync imports it from here)
from loracli.training.checkpoints import MARKER, Checkpoint, checkpoint_dir, latest, pickled_files
from loracli.training.checkpoints import scan as checkpoints  # noqa: F401
from loracli.training.checkpoints import verify


def resolve(run: str) -> Path:
    """A run folder from a path, or from a profile name (its output_dir)."""
    path = Path(run).expanduser()
    if (path / "run.json").is_file() or (path / "checkpoints").is_dir():
        return path
    from loracli import profiles

    try:
        profile = profiles.load(run)
    except LoraError:
        profile = None
    if profile is not None:
        out = Path(profile.train.output_dir.format(profile=profile.name)).expanduser()
        if (out / "run.json").is_file() or (out / "checkpoints").is_dir():
            return out
        raise LoraError(f"profile {run!r} has no run yet at {out}",
                        f"start it with `lora train --profile {run}`")
    raise LoraError(f"{run}: not a run folder (no run.json or checkpoints/)",
                    "pass the run's output folder, e.g. `output/anime`, or a profile name")


def info(run_dir: Path) -> dict:
    path = Path(run_dir) / "run.json"
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise LoraError(f"{run_dir}: no run.json; not a run folder",
                        "pass the folder `lora train` wrote, e.g. output/anime") from None


def default_output_dir(profile_name: str, template: str) -> Path:
    return Path(template.format(profile=profile_name)).expanduser()


# ---------------------------------------------------------------- starting and resuming


def _frozen(profile):
    """The profile with its paths made absolute, as the run folder records it."""
    from loracli import profiles

    data = profile.to_dict()
    data["data"]["dir"] = str(Path(profile.data.dir).expanduser().resolve())
    out = default_output_dir(profile.name, profile.train.output_dir)
    data["train"]["output_dir"] = str(out.resolve())
    return profiles.parse(data, name=profile.name)


def load_profile(run_dir: Path):
    """The run's frozen profile (profile.toml)."""
    from loracli import profiles

    path = Path(run_dir) / "profile.toml"
    name = info(run_dir).get("profile", Path(run_dir).name)
    return profiles.parse(profiles.read_mapping(path), name=name, source=str(path))


def changed_keys(old, new) -> list[str]:
    """`section.key: old → new` for every key that differs."""
    a, b = old.to_dict(), new.to_dict()
    return [f"{s}.{k}: {a[s][k]!r} → {b[s][k]!r}" for s in a for k in a[s] if a[s][k] != b[s][k]]


def start(profile, restart: bool = False,
          on_warning: Callable[[str], None] | None = None,
          invocation: str | None = None) -> tuple[Path, bool]:
    """The run folder for `profile`: `(path, True)` when an existing run is to be resumed.

    `invocation` is the command that started it, for the hint (default `lora train --profile NAME`).
    """
    import datetime as dt

    from loracli import __version__, families

    warn = on_warning or (lambda _m: None)
    profile = _frozen(profile)
    run_dir = Path(profile.train.output_dir)
    if (run_dir / "run.json").is_file():
        if restart:
            stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
            aside = run_dir.with_name(f"{run_dir.name}.{stamp}")
            run_dir.rename(aside)
            warn(f"kept the previous run as {aside}; starting a new one in {run_dir}")
        else:
            frozen = load_profile(run_dir)
            changed = changed_keys(frozen, profile)
            if changed:
                restart = f"`{invocation or 'lora train --profile ' + profile.name} --restart`"
                hint = (f"`lora resume {run_dir}` continues with the run's own settings; "
                        f"{restart} starts a new run (the old one is kept)")
                only_longer = [c.split(":")[0] for c in changed] == ["train.max_steps"]
                if only_longer and profile.train.max_steps:
                    hint = (f"to train longer, `lora resume {run_dir} --until-step "
                            f"{profile.train.max_steps}`; {restart} starts a new run")
                raise LoraError(
                    f"profile {profile.name!r} changed since the run in {run_dir} started",
                    hint, details=changed)
            return run_dir, True
    family = families.for_base(profile.model.family, profile.model.base)
    family.runs.load("start")(run_dir, profile, __version__, warn)
    return run_dir, False


def family_of(run_dir: Path):
    """The model family of a run (`loracli.families`), from its run.json."""
    from loracli import families

    return families.of_run(info(run_dir))


def pick_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest complete checkpoint; newer broken ones are named in a warning and skipped."""
    found = checkpoints(run_dir)
    complete = [c for c in found if c.complete]
    for c in found:
        if not c.complete and (not complete or c.step > complete[-1].step):
            warn(f"skipping checkpoint {c.path.name}: {c.problem}")
    restart = (f"`lora train --profile {_profile_name(run_dir)} --restart` (or your --config "
               "file with --restart) starts the run again")
    if found and not complete:
        raise LoraError(f"{run_dir}: no complete checkpoint to resume from",
                        f"{restart}; the broken one is kept")
    if complete and pickled_files(complete[-1].path):
        raise LoraError(f"{complete[-1].path} was saved by an older lora in a format that "
                        "cannot be resumed safely (its optimizer, scheduler and RNG state are "
                        "pickles, which lora never loads)",
                        f"{restart}; the old run is kept, and `lora export {run_dir}` still "
                        "exports its LoRA")
    return complete[-1] if complete else None


def _profile_name(run_dir: Path) -> str:
    try:
        return info(run_dir).get("profile", "NAME")
    except (LoraError, ValueError):
        return "NAME"
