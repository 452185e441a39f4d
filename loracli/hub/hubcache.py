"""The model cache on disk: the Hugging Face hub layout, and the rules for names that enter it.

    <cache>/models--{org}--{name}/blobs/{sha256 or git sha1}[.incomplete]
                                 /snapshots/{commit}/{path}   (relative links into blobs/)
                                 /refs/{revision}             (the commit sha)
    <cache>/.locks/models--{org}--{name}.lora.lock

Every name in those paths that a mirror or a user chose (commit, file path, blob digest,
revision) is checked here before it touches the disk, and every path written, linked or deleted
is resolved and must stay inside the cache root (`inside`). A name that fails is a `BadName`.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

from loracli import atomic, paths
from loracli.errors import LoraError

SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_PATH = 1024  # bytes; longer names are not in any real model repo


class BadName(LoraError):
    """A name from outside (mirror answer, argument) that cannot become part of a cache path."""

    def __init__(self, message: str):
        super().__init__(message, "the mirror's answer is unsafe; use another: lora mirror test")


def shown(text: object, limit: int = 80) -> str:
    """`text` as it may be printed: control characters escaped, cut to `limit` characters."""
    s = repr(str(text))[1:-1] if _CONTROL_RE.search(str(text)) else str(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def check_commit(commit: object) -> str:
    """A commit sha: exactly 40 hex digits (returned in lower case)."""
    text = str(commit or "").strip().lower()
    if not SHA1_RE.match(text):
        raise BadName(f"commit '{shown(commit)}' is not a 40-hex sha")
    return text


def check_digest(digest: object, what: str = "blob digest") -> str:
    """A blob name: a sha256 (64 hex, what LFS publishes) or a git blob sha1 (40 hex)."""
    text = str(digest or "").strip().lower()
    if not (SHA256_RE.match(text) or SHA1_RE.match(text)):
        raise BadName(f"{what} '{shown(digest)}' is neither a sha256 (64 hex) nor a git sha1 (40 hex)")
    return text


def check_rel_path(rel_path: object, what: str = "file path") -> str:
    """A repository file path as huggingface_hub accepts it, and stricter: relative, '/'-separated,
    no empty, '.' or '..' component, no NUL or control character, no backslash, no drive or UNC
    prefix. Returns the path unchanged."""
    p = rel_path if isinstance(rel_path, str) else ""
    problem = None
    if not p:
        problem = "is empty"
    elif _CONTROL_RE.search(p):
        problem = "contains a NUL or control character"
    elif "\\" in p:
        problem = "contains a backslash"
    elif len(p.encode("utf-8", "surrogatepass")) > MAX_PATH:
        problem = "is too long"
    else:
        parts = p.split("/")
        if p.startswith("/") or PurePosixPath(p).is_absolute():
            problem = "is absolute"
        elif any(part in ("", ".", "..") for part in parts):
            problem = "has an empty, '.' or '..' component"
        elif any(PureWindowsPath(part).drive or PureWindowsPath(part).root for part in parts):
            problem = "has a drive or UNC prefix"
    if problem:
        raise BadName(f"refusing {what} '{shown(rel_path)}': it {problem} (it would leave the "
                      "repository folder or cannot be a file name)")
    return p


def inside(root: Path, path: Path) -> Path:
    """`path` (resolved: symlinks followed, `..` collapsed) when it lies inside `root`; else
    `BadName`. The last component is not followed, so a snapshot link itself can be checked."""
    base = Path(os.path.realpath(root))
    path = Path(path)
    real = Path(os.path.realpath(path.parent)) / path.name
    if path.name in ("", ".", "..") or (real != base and base not in real.parents):
        raise BadName(f"refusing to write {shown(path, 160)}: it resolves outside {base}")
    return real


def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    if not re.match(r"^[\w.\-]+/[\w.\-]+$", repo_id or "") or ".." in repo_id:
        raise BadName(f"repository id '{shown(repo_id)}' is not org/name")
    return Path(cache or paths.cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def lock_path(repo_dir: Path) -> Path:
    """The one lock of a model in the cache, shared by fetch, install, remove and prune."""
    locks = repo_dir.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    return inside(repo_dir.parent, locks / f"{repo_dir.name}.lora.lock")


def model_lock(repo_dir: Path):
    from filelock import FileLock

    return FileLock(str(lock_path(repo_dir)))


def blob_path(repo_dir: Path, digest: str) -> Path:
    return inside(repo_dir.parent, repo_dir / "blobs" / check_digest(digest))


def snapshot_dir(repo_dir: Path, commit: str) -> Path:
    return inside(repo_dir.parent, repo_dir / "snapshots" / check_commit(commit))


def commit_for(repo_id: str, revision: str, cache: Path | None = None) -> str | None:
    """The commit a revision points at in the cache (a sha is its own answer), or None."""
    if SHA1_RE.match(revision):
        return revision
    try:
        check_rel_path(revision, "revision")
        sha = (repo_folder(repo_id, cache) / "refs" / revision).read_text("utf-8").strip()
    except (OSError, LoraError):
        return None
    return sha if SHA1_RE.match(sha) else None


def link_into_snapshot(repo_dir: Path, commit: str, rel_path: str, blob_name: str) -> Path:
    """Point `snapshots/<commit>/<rel_path>` at `blobs/<blob_name>` (a relative symlink, as
    huggingface_hub makes; a copy where symlinks are not allowed)."""
    root = repo_dir.parent
    snap = snapshot_dir(repo_dir, commit)
    blob = blob_path(repo_dir, blob_name)
    target = snap / check_rel_path(rel_path)
    inside(root, target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    target = inside(snap, target)  # after mkdir: no folder on the way is a link out of the cache
    rel = os.path.relpath(blob, target.parent)
    if target.is_symlink() and os.readlink(target) == rel:
        return target
    tmp = target.with_name(f".{target.name}.lnk")
    if tmp.exists() or tmp.is_symlink():
        tmp.unlink()
    try:
        os.symlink(rel, tmp)
    except OSError:
        shutil.copyfile(blob, tmp)
    os.replace(tmp, target)
    return target


def set_ref(repo_dir: Path, revision: str, commit: str) -> None:
    """`refs/<revision>` ← commit (a sha asked for by its own sha needs no ref)."""
    commit = check_commit(commit)
    if SHA1_RE.match(revision):
        return
    ref = inside(repo_dir.parent, repo_dir / "refs" / check_rel_path(revision, "revision"))
    atomic.write_text(ref, commit)
