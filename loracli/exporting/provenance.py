"""Where an export came from, said without the user's local paths.

A shared LoRA travels to model sites and other people's WebUIs: its header and configs must not
publish the trainer's directory layout. So, unless the user asks (`--keep-paths`):

- a base model from the hub cache is named by its repo and commit (`org/name`, 40-hex commit);
- a local folder or single file by its base name; a single file (or a repo whose snapshot holds one
  single-file checkpoint) also by its hashes, as kohya sd-scripts writes them:
  `ss_sd_model_hash` = A1111's legacy hash (sha256 of the 64 KiB at offset 1 MiB, 8 hex digits),
  `ss_new_sd_model_hash` = sha256 of the whole file;
- a data folder by its base name.

`record_dataset` is what the trainer calls once it has planned the buckets, so that export can
write `ss_dataset_dirs`/`ss_bucket_info` from the run folder alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

LEGACY_OFFSET, LEGACY_SIZE = 0x100000, 0x10000   # A1111 modules/hashes.py, sd-scripts model_hash
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
PATH_KEYS = ("_name_or_path", "name_or_path", "base_model_name_or_path")


@dataclass(frozen=True)
class BaseIdentity:
    name: str                  # ss_sd_model_name: "org/name", or a file or folder's base name
    label: str                 # loracli.base_model: "org/name@commit", or the base name
    repo: str = ""
    commit: str = ""
    legacy_hash: str = ""      # ss_sd_model_hash
    sha256: str = ""           # ss_new_sd_model_hash
    path: str = ""             # the local path, only with keep_paths


def base_identity(base: dict, keep_paths: bool = False) -> BaseIdentity:
    """How run.json's "base" is named in an export."""
    repo, commit = base.get("repo") or "", base.get("commit") or ""
    local = Path(base.get("path") or base.get("model") or "")
    checkpoint = local if local.is_file() else _single_checkpoint(local) if repo else None
    legacy, digest = file_hashes(checkpoint) if checkpoint else ("", "")
    if repo:
        name, label = repo, f"{repo}@{commit}" if commit else repo
    else:
        name = label = local.name or str(base.get("model") or "")
    path = str(local) if keep_paths and str(local) not in ("", ".") else ""
    if keep_paths and not repo:
        name = label = str(base.get("model") or local)
    return BaseIdentity(name, label, repo, commit, legacy, digest, path)


def public_path(value: str, keep_paths: bool = False) -> str:
    """A data or output folder as an export may show it: its base name."""
    if not value or keep_paths:
        return value
    return Path(value).name


def file_hashes(path: Path) -> tuple[str, str]:
    """(A1111 legacy 8-hex hash, sha256) of a file; a hub-cache blob's name is its sha256."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(LEGACY_OFFSET)
        legacy = hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
    blob = path.resolve().name
    if path.is_symlink() and _SHA256.match(blob):
        return legacy, blob
    from loracli import hashing

    return legacy, hashing.sha256_file(path)


def _single_checkpoint(folder: Path) -> Path | None:
    """The one single-file checkpoint at a snapshot's root (the same weights as its folders)."""
    if not folder.is_dir():
        return None
    found = [p for p in folder.glob("*.safetensors") if p.is_file()]
    return found[0] if len(found) == 1 else None


def scrub_config_folder(folder: Path, public: str, local_roots: list[str]) -> None:
    """Rewrite every JSON file under `folder` (a saved pipeline) so that no value names a local
    path: `_name_or_path`-style keys get `public`, any other string under a local root its base
    name."""
    from loracli import atomic

    roots = [r for r in local_roots if r and r not in (".", "/")]

    def clean(value, key=""):
        if isinstance(value, dict):
            return {k: clean(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            if key in PATH_KEYS and value:
                return public
            if any(root in value for root in roots):
                return Path(value).name
        return value

    for path in sorted(Path(folder).rglob("*.json")):
        try:
            data = json.loads(path.read_text("utf-8"))
        except ValueError:
            continue
        cleaned = clean(data)
        if cleaned != data:
            atomic.write_text(path, json.dumps(cleaned, indent=2, sort_keys=True) + "\n")


def record_dataset(run_dir: Path, data) -> None:
    """Add the planned dataset's folders and buckets to dataset.json (kohya's ss_dataset_dirs and
    ss_bucket_info); `data` is `dataset.plan(...)`'s result."""
    from loracli import atomic

    path = Path(run_dir) / "dataset.json"
    try:
        recorded = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        recorded = {}
    facts = {"dirs": dataset_dirs(data), "buckets": bucket_info(data)}
    if any(recorded.get(k) != v for k, v in facts.items()):
        atomic.write_json(path, {**recorded, **facts})


def dataset_dirs(data) -> dict:
    """{folder base name: {"n_repeats", "img_count"}}, sd-scripts' ss_dataset_dirs."""
    dirs: dict[str, dict] = {}
    for sample in data.samples:
        ex = sample.example
        entry = dirs.setdefault(ex.folder or ex.path.parent.name,
                                {"n_repeats": ex.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dict(sorted(dirs.items()))


def bucket_info(data) -> dict:
    """{"buckets": {i: {"resolution": [w, h], "count": images with repeats}}, "mean_img_ar_error"},
    sd-scripts' ss_bucket_info (the error is over images, without repeats)."""
    buckets = {i: {"resolution": list(size), "count": len(members)}
               for i, (size, members) in enumerate(data.buckets.items())}
    errors = [abs(s.bucket[0] / s.bucket[1] - s.size[0] / s.size[1]) for s in data.samples]
    return {"buckets": buckets, "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}
