"""A run's checkpoints: the one place that knows their layout, writes them and reads them back.

    checkpoints/step-000100/
      unet/adapter_model.safetensors, unet/adapter_config.json          (peft format)
      text_encoder[_2]/adapter_model.safetensors, …/adapter_config.json (when trained)
      optimizer.json + optimizer.safetensors   optimizer state: structure + tensors
      scheduler.json                           learning-rate scheduler state
      rng.json + rng.safetensors               torch (CPU, CUDA), numpy and python RNG states
      state.json     {"format": 2, "step", "epoch", …, "files": {relative path: sha256}}
      COMPLETE       written last; a checkpoint without it is ignored

Nothing here is pickled: trainer state is JSON + safetensors (`loracli.training.statefiles`), so a run
folder from someone else is data, never code. Checkpoints of older lora (state.json without
"format") held `*.pt` pickles instead; `trainer_state` refuses them (their adapters still export).

A checkpoint is written into `checkpoints/.step-NNNNNN.partial/`, every file fsynced, `state.json`
next, `COMPLETE` last, and only then renamed to `step-NNNNNN/`. A process killed at any point
leaves the previous checkpoints untouched plus a `.partial` folder that nothing trusts (and the
next save removes), or a whole checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from loracli import atomic
from loracli.errors import LoraError
from loracli.hashing import sha256_file
from loracli.training import statefiles

FORMAT = 2
STEP_DIR = re.compile(r"^step-(\d+)$")
MARKER = "COMPLETE"
STATE = "state.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
TRAINER_PARTS = ("optimizer", "scheduler", "rng")
PICKLED = ("optimizer.pt", "scheduler.pt", "rng.pt")  # older lora: never loaded
MARGIN = 64 << 20  # keep this much disk free beyond the checkpoint itself


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool
    problem: str | None = None  # why it cannot be trusted, when not complete


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


# ---------------------------------------------------------------- reading


def verify(path: Path, deep: bool = True) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    if not (path / MARKER).is_file():
        return "no COMPLETE marker (interrupted while saving)"
    try:
        state = json.loads((path / STATE).read_text("utf-8"))
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    for rel, digest in state.get("files", {}).items():
        f = path / rel
        if not f.is_file():
            return f"{rel} missing"
        if deep and sha256_file(f) != digest:
            return f"{rel} does not match its sha256 (truncated or corrupt)"
    return None


def scan(run_dir: Path, deep: bool = True) -> list[Checkpoint]:
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
    all_ = scan(run_dir)
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


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE).read_text("utf-8"))


def pickled_files(ckpt: Path) -> list[str]:
    """The `*.pt` pickles of an old-format checkpoint (listed in state.json or present)."""
    listed = set(read_state(ckpt).get("files", {}))
    return [n for n in PICKLED if n in listed or (Path(ckpt) / n).exists()]


def load_adapters(ckpt: Path) -> dict:
    """{component: peft state dict} of a checkpoint."""
    from safetensors.torch import load_file

    return {rel.split("/")[0]: load_file(str(Path(ckpt) / rel))
            for rel in read_state(ckpt)["files"] if rel.endswith("/" + ADAPTER_WEIGHTS)}


def trainer_state(ckpt: Path) -> dict:
    """{"optimizer", "scheduler", "rng"} as saved; an old pickled checkpoint is refused."""
    ckpt = Path(ckpt)
    old = pickled_files(ckpt)
    if old:
        raise LoraError(f"{ckpt} was written by an older lora: its trainer state "
                        f"({', '.join(old)}) is a pickle, which lora never loads")
    out = {}
    for part in TRAINER_PARTS:
        blob = ckpt / f"{part}.safetensors"
        try:
            out[part] = statefiles.from_bytes((ckpt / f"{part}.json").read_bytes(),
                                              blob.read_bytes() if blob.is_file() else None)
        except Exception as e:  # noqa: BLE001 - missing, garbled or hostile: never trusted
            raise LoraError(f"{ckpt}: the {part} state cannot be read ({type(e).__name__})",
                            "delete this checkpoint folder to resume from the one before it"
                            ) from None
    return out


def load(ckpt: Path) -> dict:
    """{"state": state.json, "adapters": {component: state dict}, "optimizer", "scheduler",
    "rng"}."""
    return {"state": read_state(ckpt), "adapters": load_adapters(ckpt), **trainer_state(ckpt)}


# ---------------------------------------------------------------- writing


def _tensor_bytes(state: dict) -> int:
    return sum(v.numel() * v.element_size() for v in state.values() if hasattr(v, "numel"))


def estimate_size(adapters: dict, other_bytes: int) -> int:
    return sum(_tensor_bytes(sd) for sd, _ in adapters.values()) + other_bytes + (1 << 20)


def check_disk(folder: Path, needed: int, run_dir: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed + MARGIN:
        raise LoraError(
            f"not enough disk space for a checkpoint in {folder}: {free / 2**20:.0f} MiB free, "
            f"{(needed + MARGIN) / 2**20:.0f} MiB needed",
            _free_hint(folder, needed + MARGIN - free, run_dir))


def _free_hint(folder: Path, missing: int, run_dir: Path) -> str:
    return (f"free at least {max(1, missing >> 20)} MiB on the disk holding {folder} (older "
            f"runs, `lora cache rm …`) or lower train.keep_checkpoints, then `lora resume {run_dir}`")


def write_error(e: OSError, what: str, folder: Path, needed: int, run_dir: Path) -> LoraError:
    """The user-facing error for an OSError while writing `what` into `folder`."""
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return LoraError(f"no space left while writing {what} in {folder}",
                         _free_hint(folder, needed, run_dir))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LoraError(f"cannot write {what} in {folder}: {reason}",
                         f"make {folder} writable (or set train.output_dir to a writable "
                         f"folder and start again), then `lora resume {run_dir}`")
    return LoraError(f"could not write {what} in {folder}: {reason}",
                     f"check the disk holding {folder} and free some space, then "
                     f"`lora resume {run_dir}`")


def _fsynced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove folders an interrupted save left behind (never trusted, never resumed from)."""
    root = Path(run_dir) / "checkpoints"
    removed = []
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".step-") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
    return removed


def _config_dict(config) -> dict:
    out = {}
    for k, v in config.to_dict().items():
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        elif hasattr(v, "value"):  # enums (peft_type, task_type)
            v = v.value
        out[k] = v
    return out


def _files(adapters: dict, trainer: dict) -> dict[str, bytes]:
    """Every file of a checkpoint but state.json and COMPLETE, as bytes."""
    from safetensors.torch import save as st_save

    files = {}
    for component, (sd, config) in adapters.items():
        tensors = {k: v.detach().to("cpu").float().contiguous() for k, v in sd.items()}
        files[f"{component}/{ADAPTER_WEIGHTS}"] = st_save(tensors, metadata={"format": "pt"})
        files[f"{component}/{ADAPTER_CONFIG}"] = json.dumps(
            _config_dict(config), indent=2, sort_keys=True).encode()
    for part in TRAINER_PARTS:
        text, blob = statefiles.to_bytes(trainer[part])
        files[f"{part}.json"] = text
        if blob is not None:
            files[f"{part}.safetensors"] = blob
    return files


def save(run_dir: Path, step: int, adapters: dict, trainer: dict, state: dict,
         keep: int) -> Path:
    """Write checkpoint `step` atomically; prune to the newest `keep` complete ones.

    adapters: {component: (peft state dict, LoraConfig)}; trainer: {"optimizer", "scheduler",
    "rng"} state dicts; state: JSON facts (step, epoch, data position…). A write error is a
    LoraError naming what to free; the checkpoints already there are untouched.
    """
    run_dir = Path(run_dir)
    final = checkpoint_dir(run_dir, step)
    root = final.parent
    clean_partial(run_dir)
    files = _files(adapters, trainer)
    needed = sum(len(b) for b in files.values()) + (1 << 20)
    check_disk(root, needed, run_dir)
    tmp = root / f".{final.name}.partial"
    try:
        _write(tmp, files, {**state, "format": FORMAT, "step": step})
        if final.exists():  # a re-save of the same step (e.g. after a resume); swap it out
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        atomic.fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(e, f"checkpoint {final.name}", root, needed, run_dir) from None
    prune(run_dir, keep)
    return final


def _write(tmp: Path, files: dict[str, bytes], state: dict) -> None:
    tmp.mkdir(parents=True)
    for rel, data in files.items():
        (tmp / rel).parent.mkdir(exist_ok=True)
        _fsynced(tmp / rel, data)
    pause = float(os.environ.get("LORA_TEST_SAVE_PAUSE", "0") or 0)
    if pause:  # fault-injection hook for the crash tests: a window to kill a save mid-way
        time.sleep(pause)
    digests = {rel: sha256_file(tmp / rel) for rel in files}
    _fsynced(tmp / STATE, json.dumps({**state, "files": digests}, indent=2,
                                     sort_keys=True).encode())
    for folder in {(tmp / rel).parent for rel in files}:
        atomic.fsync_dir(folder)
    _fsynced(tmp / MARKER, b"")
    atomic.fsync_dir(tmp)


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints, and broken ones older than those.

    The newest complete checkpoint is never deleted.
    """
    found = scan(run_dir, deep=False)
    complete = [c for c in found if c.complete]
    keep_set = {c.path for c in complete[-max(1, keep):]}
    newest = complete[-1].step if complete else None
    removed = []
    for c in found:
        stale_broken = not c.complete and newest is not None and c.step < newest
        if (c.complete and c.path not in keep_set) or stale_broken:
            shutil.rmtree(c.path, ignore_errors=True)
            removed.append(c.path)
    return removed
