"""Captions from CLIP alone: label banks ranked per category, assembled into one caption per image.

A label bank (`loracli.banks`) is a TOML file of categories (medium, subject, style, lighting,
colour, …). Each label is encoded with a few prompt templates, averaged and normalised (`loracli.clipmodel` does
that and caches the result); here, everything is a pure function over those embeddings:

* a single-answer category names its best label when that label's probability among the
  category's labels (softmax at the model's own logit scale) reaches `threshold`;
* a multi-label category names up to `top_k` labels that beat a neutral baseline prompt
  (`neutral`, e.g. "an image") by `margin`.

The caption is the prefix (trigger word) first, then the tags in bank order, cut at CLIP's
77 tokens (75 between the start and end tokens). `caption_folder` runs the whole job: caption
files beside the images and a `metadata.csv` per folder, written atomically.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from loracli.banks import Bank, Category, load_bank
from loracli.errors import LoraError

MAX_TOKENS = 75  # CLIP's 77 minus the start and end tokens

@dataclass(frozen=True)
class Tag:
    category: str
    label: str
    score: float  # single: probability among the category's labels; multi: cosine over baseline


# --- ranking (pure, over unit-length embeddings) ---------------------------------------------

def label_texts(category: Category) -> list[str]:
    """Every prompt a category needs encoded: each label under each template, then the neutral."""
    return [t.format(label) for label in (*category.labels, category.neutral)
            for t in category.templates]


def average_templates(text_embs, category: Category):
    """(labels + neutral) x templates rows → one unit vector per label, and the neutral one."""
    import numpy as np

    n_t = len(category.templates)
    e = np.asarray(text_embs, dtype=np.float32).reshape(len(category.labels) + 1, n_t, -1)
    e = e.mean(axis=1)
    e /= np.linalg.norm(e, axis=1, keepdims=True).clip(min=1e-12)
    return e[:-1], e[-1]


def rank(image_embs, category: Category, label_embs, neutral_emb,
         logit_scale: float = 100.0) -> list[list[Tag]]:
    """The tags a category gives each image (rows of `image_embs`, unit length)."""
    import numpy as np

    img = np.asarray(image_embs, dtype=np.float32)
    sims = img @ np.asarray(label_embs, dtype=np.float32).T  # [images, labels]
    out: list[list[Tag]] = []
    if not category.multi:
        logits = logit_scale * sims
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        for row in probs:
            best = int(row.argmax())
            ok = row[best] >= category.threshold
            out.append([Tag(category.name, category.labels[best], float(row[best]))] if ok else [])
        return out
    baseline = img @ np.asarray(neutral_emb, dtype=np.float32)  # [images]
    gain = sims - baseline[:, None]
    for row in gain:
        order = np.argsort(-row, kind="stable")[: category.top_k]
        out.append([Tag(category.name, category.labels[j], float(row[j]))
                    for j in order if row[j] > category.margin])
    return out


def rank_bank(image_embs, bank: Bank, embeddings: dict, logit_scale: float) -> list[list[Tag]]:
    """Tags for each image over every category of `bank`, in bank order.

    `embeddings` maps a category name to its (label_embs, neutral_emb).
    """
    per_image: list[list[Tag]] = [[] for _ in range(len(image_embs))]
    for cat in bank.categories:
        label_embs, neutral = embeddings[cat.name]
        for tags, found in zip(per_image, rank(image_embs, cat, label_embs, neutral, logit_scale)):
            tags.extend(found)
    return per_image


# --- caption text ----------------------------------------------------------------------------

def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def assemble(prefix: str, tags: Iterable[str], count_tokens: Callable[[str], int],
             existing: str = "", max_tokens: int = MAX_TOKENS) -> str:
    """`prefix, existing…, tags…` without repeats, dropping trailing new tags past `max_tokens`.

    The prefix and an existing caption (`--existing append`) are never cut; the tags come in
    priority (bank) order, so the least important go first.
    """
    head = split_tags(existing)
    prefix = prefix.strip()
    if prefix and (not head or head[0] != prefix):
        head = [prefix, *(t for t in head if t != prefix)]
    parts = list(head)
    seen = {t.lower() for t in parts}
    for tag in tags:
        if tag.lower() in seen:
            continue
        candidate = ", ".join([*parts, tag])
        if count_tokens(candidate) > max_tokens:
            continue  # a shorter tag further down may still fit
        parts.append(tag)
        seen.add(tag.lower())
    return ", ".join(parts)


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """How many captions hold each tag, most frequent first (ties alphabetical)."""
    counts = Counter(tag for text in captions for tag in dict.fromkeys(split_tags(text)))
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def clip_token_counter() -> Callable[[str], int]:
    """Tokens a caption costs in Stable Diffusion's CLIP text encoder (start/end excluded)."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    return lambda text: len(tokenizer.encode(text))


def check_prefix(prefix: str, count_tokens: Callable[[str], int]) -> None:
    n = count_tokens(prefix.strip()) if prefix.strip() else 0
    if n > MAX_TOKENS:
        raise LoraError(f"--prefix is {n} CLIP tokens; a caption holds at most {MAX_TOKENS}",
                        "use a shorter trigger, e.g. --prefix \"sks style\"")


def batches(items: Sequence, size: int) -> Iterable[Sequence]:
    size = max(1, int(size))
    for i in range(math.ceil(len(items) / size)):
        yield items[i * size:(i + 1) * size]


# --- folders: what exists, what to write -----------------------------------------------------

EXISTING = ("skip", "overwrite", "append")
METADATA = "metadata.csv"


@dataclass
class Entry:
    """One image: where its caption goes and the caption it already has (if any)."""

    image: Path
    caption_file: Path
    existing: str | None  # the newer of its metadata.csv row and caption file, else None
    text: str | None = None  # the caption it ends with
    status: str = "pending"  # captioned | kept | failed
    error: str = ""


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


def read_metadata(folder: Path) -> tuple[list[str], list[dict]]:
    """(columns, rows) of `folder/metadata.csv`; ([], []) when there is none."""
    import csv

    path = folder / METADATA
    if not path.is_file():
        return [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = [dict(r) for r in reader]
            columns = list(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise LoraError(f"{path}: unreadable ({e})", f"fix or delete {path}, then rerun") from None
    if "file_name" not in columns:
        raise LoraError(f"{path}: has no file_name column",
                        f"rename its image column to file_name, or delete {path}")
    return columns, rows


def plan(folder: Path, images: list[Path], ext: str) -> list[Entry]:
    """Each image with its caption file and the caption it already has: the newer of its
    metadata.csv row and its caption file, so a hand edit to either is what is kept (and
    the rewritten metadata.csv carries an edited caption file to the trainer, which reads
    metadata.csv first)."""
    rows_by_dir: dict[Path, tuple[dict[str, str], float]] = {}
    entries = []
    for image in images:
        if image.parent not in rows_by_dir:
            _, rows = read_metadata(image.parent)
            meta = image.parent / METADATA
            rows_by_dir[image.parent] = (
                {r["file_name"].strip(): (r.get("text") or "").strip()
                 for r in rows if r.get("file_name")},
                meta.stat().st_mtime if rows else 0.0)
        rows, meta_mtime = rows_by_dir[image.parent]
        caption_file = image.with_suffix(ext)
        existing = rows.get(image.name)
        if caption_file.is_file() and (not existing or caption_file.stat().st_mtime > meta_mtime):
            existing = caption_file.read_text("utf-8", errors="replace").strip() or existing
        entries.append(Entry(image, caption_file, existing or None))
    return entries


def metadata_text(columns: list[str], old_rows: list[dict], entries: list[Entry]) -> str:
    """metadata.csv for one folder: a row per image with a caption, in file order; other
    columns and rows naming files we did not see (e.g. `sub/x.png`) are kept as they were."""
    import csv
    import io

    columns = ["file_name", "text", *(c for c in columns if c not in ("file_name", "text"))]
    old = {r.get("file_name", "").strip(): r for r in old_rows}
    ours = {e.image.name for e in entries}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for e in entries:
        if e.text:
            writer.writerow({**old.get(e.image.name, {}), "file_name": e.image.name, "text": e.text})
    for name, row in old.items():
        if name and name not in ours:
            writer.writerow(row)
    return buf.getvalue()


def write_metadata(entries: list[Entry]) -> list[Path]:
    """One metadata.csv per folder that holds images with a caption; each written atomically."""
    from loracli import atomic

    by_dir: dict[Path, list[Entry]] = {}
    for e in entries:
        by_dir.setdefault(e.image.parent, []).append(e)
    written = []
    for folder, group in by_dir.items():
        if not any(e.text for e in group):
            continue
        columns, rows = read_metadata(folder)
        text, path = metadata_text(columns, rows, group), folder / METADATA
        if not path.is_file() or path.read_text("utf-8-sig", errors="replace") != text:
            atomic.write_text(path, text)
        written.append(path)
    return written


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

    `clip` is a loaded `loracli.clipmodel.ClipModel` (loaded from `options` when None; not at all
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
    entries = plan(folder, images, ext)
    todo = []
    for e in entries:
        if e.existing is None or options.existing != "skip":
            todo.append(e)
        else:
            e.text, e.status = e.existing, "kept"

    timings = {"load_model_s": 0.0, "text_s": 0.0, "images_s": 0.0}
    text_cache = {"hits": 0, "misses": 0}
    if todo:
        from loracli import clipmodel

        count_tokens = clip_token_counter()
        check_prefix(options.prefix, count_tokens)
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
        for batch, loaded in zip(batches(todo, options.batch_size),
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
                for e, tags in zip(ok, rank_bank(image_embs, bank, embeddings, clip.logit_scale)):
                    keep = e.existing if options.existing == "append" else ""
                    e.text = assemble(options.prefix, [t.label for t in tags], count_tokens,
                                      existing=keep or "")
                    e.status = "captioned"
                if not options.dry_run:
                    _write_captions(ok)
            done += len(batch)
            if on_progress:
                on_progress(done, len(todo))
        timings["images_s"] = time.perf_counter() - t2

    captioned = [e for e in entries if e.status == "captioned"]
    failed = [e for e in entries if e.status == "failed"]
    metadata = [] if options.dry_run else write_metadata(entries)
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
        "tag_frequency": tag_frequency(e.text or "" for e in entries),
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


def _write_captions(batch: list[Entry]) -> None:
    from loracli import atomic

    for e in batch:
        if e.status == "captioned" and e.text is not None:
            atomic.write_text(e.caption_file, e.text + "\n")
