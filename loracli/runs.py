"""A run folder and its checkpoints: the contract between `train`, `resume` and `export`.

    output/anime/
      profile.toml                 the resolved profile, frozen at start
      run.json                     base model facts: {"base": {...}, "started_at", "lora_version"}
      dataset.json                 {"num_images", "tag_frequency": {folder: {tag: count}}, ...}
      checkpoints/step-000100/
        unet/adapter_model.safetensors, unet/adapter_config.json          (peft format)
        text_encoder[_2]/adapter_model.safetensors, …/adapter_config.json (when trained)
        state.json                 {"step", "epoch", …, "files": {relative path: sha256}}
        COMPLETE                   written last; a checkpoint without it is ignored
      logs/metrics.jsonl, loss.png, samples/
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError

STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool
    problem: str | None = None  # why it cannot be trusted, when not complete


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


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


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, deep: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    if not (path / MARKER).is_file():
        return "no COMPLETE marker (interrupted while saving)"
    try:
        state = json.loads((path / "state.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    for rel, digest in state.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} missing"
        if deep and sha256_file(f) != digest:
            return f"{rel} does not match its sha256 (truncated or corrupt)"
    return None


def checkpoints(run_dir: Path, deep: bool = True) -> list[Checkpoint]:
    """Every checkpoint folder of a run, oldest first, each verified."""
    root = Path(run_dir) / "checkpoints"
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = STEP_DIR.match(child.name)
            if m and child.is_dir():
                problem = verify(child, deep=deep)
                found.append(Checkpoint(int(m.group(1)), child, problem is None, problem))
    return sorted(found, key=lambda c: c.step)


def latest(run_dir: Path, step: int | None = None) -> Checkpoint:
    """The newest complete checkpoint (or the one at `step`); raises with a hint otherwise."""
    all_ = checkpoints(run_dir)
    complete = [c for c in all_ if c.complete]
    if step is not None:
        for c in all_:
            if c.step == step:
                if not c.complete:
                    raise LoraError(f"checkpoint at step {step} is incomplete: {c.problem}",
                                    _steps_hint(complete))
                return c
        raise LoraError(f"no checkpoint at step {step} in {run_dir}", _steps_hint(complete))
    if not complete:
        raise LoraError(f"{run_dir}: no complete checkpoint",
                        "train longer than save_steps, or lower train.save_steps")
    return complete[-1]


def _steps_hint(complete: list[Checkpoint]) -> str:
    if not complete:
        return "this run has no complete checkpoint yet"
    return "complete checkpoints: " + ", ".join(str(c.step) for c in complete)


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

    from loracli import __version__, atomic, families
    from loracli.families import loading
    from loracli import dataset as ds

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
    base = loading.resolve_base(profile.model.base, profile.model.family,
                                profile.model.prediction_type, profile.model.vae)
    family = families.get(base.family)
    examples = ds.scan(profile.data.dir, profile.data.caption_ext, profile.data.trigger, warn)
    run_dir.mkdir(parents=True, exist_ok=True)
    trained = ["unet"] + (list(family.text_encoders) if profile.lora.train_text_encoder else [])
    atomic.write_text(run_dir / "profile.toml", profile.to_toml())
    atomic.write_json(run_dir / "dataset.json", {
        "num_images": len(examples), "resolution": profile.data.resolution,
        "tag_frequency": ds.tag_frequency(examples), "fingerprint": ds.fingerprint(examples)})
    atomic.write_json(run_dir / "run.json", {
        "lora_version": __version__,
        "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "profile": profile.name, "base": base.to_dict(), "components": trained})
    return run_dir, False


def pick_checkpoint(run_dir: Path, warn: Callable[[str], None]) -> Checkpoint | None:
    """The newest complete checkpoint; newer broken ones are named in a warning and skipped."""
    found = checkpoints(run_dir)
    complete = [c for c in found if c.complete]
    for c in found:
        if not c.complete and (not complete or c.step > complete[-1].step):
            warn(f"skipping checkpoint {c.path.name}: {c.problem}")
    if found and not complete:
        name = info(run_dir).get("profile", "NAME") if (Path(run_dir) / "run.json").is_file() \
            else "NAME"
        raise LoraError(f"{run_dir}: no complete checkpoint to resume from",
                        f"`lora train --profile {name} --restart` (or your --config file with "
                        "--restart) starts the run again; the broken one is kept")
    return complete[-1] if complete else None
