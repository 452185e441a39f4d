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

