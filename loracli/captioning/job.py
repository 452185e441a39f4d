"""`lora caption`'s job over a folder: find the images, keep or redo their captions, rank CLIP
labels for the rest in batches, write caption files and metadata.csv.

The pieces it strings together: `loracli.captioning.banks` (the labels), `loracli.captioning.clipmodel` (open_clip,
loaded from the model cache), `loracli.captioning.captions` (pure ranking and caption text) and
`loracli.captioning.files` (what exists beside the images, what gets written).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli.captioning import captions
from loracli.captioning import files as caption_files
from loracli.captioning.banks import load_bank
from loracli.errors import LoraError

EXISTING = ("skip", "overwrite", "append")


@dataclass(frozen=True)
class Options:
    """What `lora caption` was asked to do."""

    labels: tuple[str, ...] = ()
    model: str = "ViT-L-14"
    weights: str = "openai"
    prefix: str = ""
    ext: str = ".txt"
    existing: str = "skip"
    recursive: bool = False
    dry_run: bool = False
    batch_size: int = 16
    device: str | None = None


def _no_images(folder: Path, recursive: bool) -> LoraError:
    from loracli.images import find_images

    if not recursive and find_images(folder, recursive=True):
        return LoraError(f"{folder}: no images directly in it (its subfolders have some)",
                         f"lora caption {folder} --recursive")
    return LoraError(f"{folder}: no images found",
                     "put .png/.jpg/.webp images in it, then rerun `lora caption` on it")


def caption_folder(folder: Path, options: Options = Options(), *, clip=None,
                   on_progress: Callable[[int, int], None] | None = None,
                   on_warning: Callable[[str], None] | None = None) -> dict:
    """Caption every image of `folder`; return what was done (counts, captions, tag frequency).

    `clip` is a loaded `loracli.captioning.clipmodel.ClipModel` (loaded from `options` when None; not at all
    when every image already has a caption and `existing` is `skip`). Raises `LoraError` when the
    folder is missing or empty, or when no image at all could be captioned.
    """
    import time

    from loracli.images import find_images

    warn = on_warning or (lambda _m: None)
    folder = Path(folder).expanduser()
    if options.existing not in EXISTING:
        raise LoraError(f"--existing {options.existing}: not one of {', '.join(EXISTING)}",
                        "use --existing skip (the default), overwrite or append")
    ext = options.ext if options.ext.startswith(".") else f".{options.ext}"
    if ext.lower() in {".png", ".jpg", ".jpeg", ".webp", ".csv", ".toml", ".json", ".safetensors"}:
        raise LoraError(f"--ext {ext}: would overwrite non-caption files", "use --ext .txt or .caption")
    images = find_images(folder, options.recursive)
    if not images:
        raise _no_images(folder, options.recursive)
    bank = load_bank(options.labels)
    entries = caption_files.plan(folder, images, ext)
    todo = []
    for e in entries:
        if e.existing is None or options.existing != "skip":
            todo.append(e)
        else:
            e.text, e.status = e.existing, "kept"

    timings = {"load_model_s": 0.0, "text_s": 0.0, "images_s": 0.0}
    text_cache = {"hits": 0, "misses": 0}
    if todo:
        from loracli.captioning import clipmodel

        count_tokens = captions.clip_token_counter()
        captions.check_prefix(options.prefix, count_tokens)
        t0 = time.perf_counter()
        if clip is None:
            clip = clipmodel.load(options.model, options.weights, options.device)
        t1 = time.perf_counter()
        embeddings = {}
        for cat in bank.categories:
            label_embs, neutral, hit = clipmodel.category_embeddings(clip, cat)
            embeddings[cat.name] = (label_embs, neutral)
            text_cache["hits" if hit else "misses"] += 1
        t2 = time.perf_counter()
        timings["load_model_s"], timings["text_s"] = t1 - t0, t2 - t1
        done = 0
        for batch, loaded in zip(captions.batches(todo, options.batch_size),
                                 clipmodel.prepared_batches(clip, [e.image for e in todo],
                                                            options.batch_size)):
            ok, pixels = [], []
            for e, px in zip(batch, loaded):
                if isinstance(px, LoraError):
                    e.status, e.error, e.text = "failed", px.message, e.existing
                    warn(f"skipping {px.message}")
                else:
                    ok.append(e)
                    pixels.append(px)
            if ok:
                image_embs = clip.encode_images(pixels)
                ranked = captions.rank_bank(image_embs, bank, embeddings, clip.logit_scale)
                for e, tags in zip(ok, ranked):
                    keep = e.existing if options.existing == "append" else ""
                    e.text = captions.assemble(options.prefix, [t.label for t in tags],
                                               count_tokens, existing=keep or "")
                    e.status = "captioned"
                if not options.dry_run:
                    caption_files.write_captions(ok)
            done += len(batch)
            if on_progress:
                on_progress(done, len(todo))
        timings["images_s"] = time.perf_counter() - t2

    captioned = [e for e in entries if e.status == "captioned"]
    failed = [e for e in entries if e.status == "failed"]
    metadata = [] if options.dry_run else caption_files.write_metadata(entries)
    result = {
        "folder": str(folder),
        "images": len(entries),
        "captioned": len(captioned),
        "kept": sum(e.status == "kept" for e in entries),
        "failed": [{"file": str(e.image), "error": e.error} for e in failed],
        "dry_run": options.dry_run,
        "metadata": [str(p) for p in metadata],
        "captions": [{"file": str(e.image), "caption_file": str(e.caption_file),
                      "text": e.text or "", "status": e.status} for e in entries],
        "tag_frequency": captions.tag_frequency(e.text or "" for e in entries),
        "labels": {"banks": list(bank.sources), "categories": len(bank.categories),
                   "labels": bank.num_labels},
        "text_cache": text_cache,
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    if todo and not captioned:
        raise LoraError(f"{folder}: no image could be captioned ({len(failed)} unreadable)",
                        "replace or remove the files listed above, then rerun",
                        details=[e.error for e in failed[:20]])
    return result
