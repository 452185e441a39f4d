"""open_clip, loaded from the model cache only, and the embeddings captioning needs.

`load("ViT-L-14", "openai")` finds the weights in `paths.cache_dir()` (where `lora fetch` puts
them) and never downloads: a missing file is a `LoraError` whose hint is the exact `lora fetch`
command. `--weights` may also be a local weights file, a `local-dir:` folder (an
`open_clip_config.json` beside the weights) or `hf-hub:org/name` (that repo's snapshot in the
cache). Label text embeddings are cached on disk, keyed by the
model's weights, the labels and the templates, so a second run spends no time on text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from loracli import paths
from loracli.errors import LoraError

DEFAULT_MODEL = "ViT-L-14"
DEFAULT_WEIGHTS = "openai"
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
CACHE_VERSION = 1


@dataclass
class ClipModel:
    """A loaded open_clip model with what captioning needs from it."""

    model: Any
    preprocess: Any  # PIL image → tensor (open_clip's eval transform)
    tokenizer: Any
    identity: str  # names the exact weights: part of the text-embedding cache key
    device: str = "cpu"
    dtype: Any = None

    @property
    def logit_scale(self) -> float:
        scale = getattr(self.model, "logit_scale", None)
        return float(scale.detach().float().exp()) if scale is not None else 100.0

    def encode_images(self, pixels: list) -> "Any":
        """Preprocessed image tensors → unit-length embeddings (numpy float32, one row each)."""
        import torch

        with torch.inference_mode():
            x = torch.stack(pixels).to(self.device, dtype=self.dtype)
            return self.model.encode_image(x, normalize=True).float().cpu().numpy()

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> "Any":
        import numpy as np
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
                out.append(self.model.encode_text(tokens, normalize=True).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


@contextmanager
def offline():
    """No network while open_clip loads: `HF_HUB_OFFLINE=1` before huggingface_hub is imported
    (it reads the variable once, at import) and on its constants if it already was; both are put
    back afterwards, so a process that goes on to `lora fetch` is not left offline."""
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    saved_const = getattr(constants, "HF_HUB_OFFLINE", None)
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env
        constants = sys.modules.get("huggingface_hub.constants")
        if constants is not None:
            constants.HF_HUB_OFFLINE = (saved_const if saved_const is not None else
                                        (saved_env or "").strip().lower() in ("1", "true", "yes", "on"))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(model: str = DEFAULT_MODEL, weights: str = DEFAULT_WEIGHTS,
         device: str | None = None) -> ClipModel:
    """Load `model` (an open_clip architecture) with `weights` (tag, file or `local-dir:`)."""
    with offline():
        model_name, pretrained, extra, identity = resolve_weights(model, weights)
        import torch

        device = device or default_device()
        precision = "fp16" if device.startswith("cuda") else "fp32"
        net, preprocess, tokenizer = _create(model_name, pretrained, extra, weights, device,
                                             precision)
    net.eval()
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return ClipModel(net, preprocess, tokenizer, f"{identity}|{precision}", device, dtype)


def _create(model_name, pretrained, extra, weights, device, precision):
    import open_clip

    try:
        net, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, precision=precision,
            cache_dir=str(paths.cache_dir()), **extra)
        tokenizer = open_clip.get_tokenizer(model_name, cache_dir=str(paths.cache_dir()))
    except Exception as e:  # open_clip raises RuntimeError/ValueError/KeyError… for bad input
        raise LoraError(f"cannot load open_clip {model_name} with weights {weights}: "
                        f"{type(e).__name__}: {e}",
                        "check --model/--weights (`lora caption --help`); "
                        "list architectures with `python -c 'import open_clip; "
                        "print(open_clip.list_models())'`") from None
    return net, preprocess, tokenizer


def resolve_weights(model: str, weights: str) -> tuple[str, str | None, dict, str]:
    """(open_clip model name, pretrained file, create_model kwargs, identity) for the options.

    Pure lookups: open_clip's tag table and the model cache, no network, no torch.
    """
    weights = (weights or "").strip()
    for spec in (model, weights):
        if spec.startswith(HF_HUB):  # an open_clip repo: its snapshot is a local-dir: folder
            from loracli.hub import models

            snapshot = models.local_snapshot(spec[len(HF_HUB):])  # hint: lora fetch ORG/NAME
            return resolve_weights("", f"{LOCAL_DIR}{snapshot}")
    if weights.startswith(LOCAL_DIR):
        folder = Path(weights[len(LOCAL_DIR):]).expanduser()
        config = folder / "open_clip_config.json"
        if not config.is_file():
            raise LoraError(f"{folder}: no open_clip_config.json (not an open_clip model folder)",
                            "point --weights local-dir:… at a folder with open_clip_config.json "
                            "and open_clip_model.safetensors")
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
        if not files:
            raise LoraError(f"{folder}: no weights file (.safetensors/.bin) beside the config",
                            "copy open_clip_model.safetensors into it")
        return f"{LOCAL_DIR}{folder}", None, {}, _file_identity(*files, config)
    if weights.endswith(WEIGHT_SUFFIXES) or os.sep in weights or Path(weights).is_file():
        path = Path(weights).expanduser()
        if not path.is_file():
            raise LoraError(f"{path}: no such weights file",
                            "pass an existing .safetensors/.bin file, a tag such as `openai`, "
                            "or local-dir:FOLDER")
        return model, str(path), {}, f"{model}|{_file_identity(path)}"
    return _from_cache(model, weights)


def _from_cache(model: str, tag: str) -> tuple[str, str, dict, str]:
    from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

    from loracli.hub import models

    arch = model.replace("/", "-")
    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        hint = (f"use one of: {', '.join(tags)}" if tags else
                "pass --model with an open_clip architecture, e.g. --model ViT-L-14")
        raise LoraError(f"open_clip has no weights tagged {tag!r} for {model}", hint)
    hub = cfg.get("hf_hub", "")
    if not hub:
        raise LoraError(f"{model} {tag}: open_clip lists no Hugging Face repo for these weights, "
                        "so they cannot come from the model cache",
                        "download the weights file yourself and pass --weights /path/to/file")
    repo_id, filename = os.path.split(hub)  # "org/name/" → default file names
    candidates = [filename] if filename else ["open_clip_model.safetensors",
                                              "open_clip_pytorch_model.bin"]
    if filename.endswith(".bin"):
        candidates.insert(0, filename[:-4] + ".safetensors")
    alias = next((a for a, spec in models.ALIASES.items() if spec.repo_id == repo_id), None)
    name = alias or repo_id
    fetch = f"lora fetch {name}" if alias else \
        f"lora fetch {repo_id} --include open_clip_config.json --include '{candidates[0]}'"
    try:
        snapshot = models.local_snapshot(name)
    except LoraError:
        raise LoraError(f"{model} `{tag}` weights ({repo_id}) are not in the model cache "
                        f"({paths.cache_dir()})", fetch) from None
    found = next((snapshot / c for c in candidates if (snapshot / c).is_file()), None)
    if found is None:
        raise LoraError(f"{repo_id} is in the model cache but has no {' or '.join(candidates)}",
                        fetch)
    extra = {"force_quick_gelu": bool(cfg.get("quick_gelu", False)),
             "force_preprocess_cfg": {k: cfg[k] for k in
                                      ("mean", "std", "interpolation", "resize_mode") if k in cfg}}
    return arch, str(found), extra, f"{arch}|{tag}|{_file_identity(found)}"


def _file_identity(*files: Path) -> str:
    """Names file contents cheaply: the resolved path (a hub blob is named by its hash), size and
    modification time; hashing a 1.7 GB file on every run would cost seconds."""
    parts = []
    for f in files:
        st = Path(f).stat()
        parts.append(f"{os.path.realpath(f)}:{st.st_size}:{st.st_mtime_ns}")
    return ";".join(parts)


# --- images ----------------------------------------------------------------------------------

def prepared_batches(clip: ClipModel, images: list[Path], batch_size: int
                     ) -> Iterator[list]:
    """Batches of preprocessed tensors (or the `ImageError` of an unusable file), one per image.

    The next batch is read and decoded in a thread while the current one is encoded (one
    thread: `load_rgb` silences a PIL warning, and warning filters are process-wide).
    """
    from loracli.images import ImageError, load_rgb

    def prepare(path: Path):
        try:
            return clip.preprocess(load_rgb(path))
        except ImageError as e:
            return e

    size = max(1, int(batch_size))
    groups = [images[i:i + size] for i in range(0, len(images), size)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(prepare, p) for p in groups[0]] if groups else []
        for i in range(len(groups)):
            current = [f.result() for f in pending]
            pending = [pool.submit(prepare, p) for p in groups[i + 1]] if i + 1 < len(groups) else []
            yield current


# --- label text embeddings, cached on disk ---------------------------------------------------

def embeddings_dir() -> Path:
    return paths.state_dir() / "caption" / "text-embeddings"


def cache_key(identity: str, texts: list[str]) -> str:
    blob = json.dumps({"v": CACHE_VERSION, "model": identity, "texts": texts}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:32]


def category_embeddings(clip: ClipModel, category) -> tuple[Any, Any, bool]:
    """(label embeddings, neutral embedding, came from the cache) for a `banks.Category`."""
    import numpy as np

    from loracli import atomic
    from loracli.captioning import captions

    texts = captions.label_texts(category)
    path = embeddings_dir() / f"{cache_key(clip.identity, texts)}.npy"
    hit = False
    embs = None
    if path.is_file():
        try:
            embs = np.load(path, allow_pickle=False)
            hit = embs.ndim == 2 and embs.shape[0] == len(texts)
        except (OSError, ValueError):
            hit = False
    if not hit:
        embs = clip.encode_texts(texts).astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, embs, allow_pickle=False)
        try:
            atomic.write_bytes(path, buf.getvalue())
        except OSError:
            pass  # a read-only state dir costs time, not correctness
    label_embs, neutral = captions.average_templates(embs, category)
    return label_embs, neutral, hit
