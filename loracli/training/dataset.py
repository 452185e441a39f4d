"""A folder of captioned images → examples, aspect-ratio buckets and a reproducible batch order.

    data/
      metadata.csv              file_name,text   (wins over caption files when present)
      a.png  a.txt              a caption file beside each image (extension configurable)
      10_character/             kohya repeat folder: its images are seen 10 times per epoch
        b.jpg  b.txt

Buckets never upscale: an image is scaled down (if needed) to fit the resolution's area, and its
sides are rounded *down* to the bucket step, so at most `step - 1` pixels are cropped per side.
The batch order of an epoch is a pure function of (seed, epoch); a run can stop anywhere and
continue from a batch index.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loracli.captioning import metadata_csv
from loracli.errors import LoraError
from loracli.images import ImageError, find_images, is_image, load_rgb

REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Example:
    path: Path
    caption: str
    folder: str = ""      # the folder it came from (tag_frequency key), e.g. "10_character"
    repeats: int = 1


@dataclass(frozen=True)
class Sample:
    """An example placed in its bucket: (width, height) of the image and of the bucket."""

    example: Example
    size: tuple[int, int]
    bucket: tuple[int, int]


@dataclass
class Dataset:
    samples: list[Sample]
    order: list[int] = field(default_factory=list)  # sample index per repeat

    @property
    def buckets(self) -> dict[tuple[int, int], list[int]]:
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i in self.order:
            groups[self.samples[i].bucket].append(i)
        return dict(sorted(groups.items()))


def _with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    if not caption:
        return trigger
    tags = [t.strip() for t in caption.split(",")]
    return caption if tags[0] == trigger else f"{trigger}, {caption}"


def scan(folder, caption_ext: str = ".txt", trigger: str = "",
         on_warning: Callable[[str], None] | None = None) -> list[Example]:
    """Every image of `folder` (and its repeat folders) with its caption.

    Captions come from `metadata.csv` when present, else from `<image><caption_ext>`; an image
    without one gets `trigger` (a warning says so). With a trigger, it leads every caption.
    """
    folder = Path(folder).expanduser()
    warn = on_warning or (lambda _m: None)
    ext = caption_ext if caption_ext.startswith(".") else f".{caption_ext}"
    places = [(folder, folder.name, 1)]
    if folder.is_dir():
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            m = REPEAT_DIR.match(sub.name)
            places.append((sub, sub.name, int(m.group(1)) if m else 1))
    examples, uncaptioned = [], []
    for place, name, repeats in places:
        meta = metadata_csv.captions(place)
        for image in find_images(place):
            rel = image.relative_to(place).as_posix()
            if rel in meta:
                caption = meta[rel]
            elif (image.with_suffix(ext)).is_file():
                caption = image.with_suffix(ext).read_text("utf-8", errors="replace").strip()
            else:
                caption = ""
            if not caption:
                uncaptioned.append(image)
            examples.append(Example(image, _with_trigger(" ".join(caption.split()), trigger),
                                    name, repeats))
    if not examples:
        raise LoraError(f"{folder}: no images found",
                        "put .png/.jpg/.webp images in it (or in repeat folders like 10_name), "
                        "or set data.dir in the profile")
    if uncaptioned:
        fallback = f"the trigger {trigger!r}" if trigger else "an empty caption"
        names = ", ".join(p.name for p in uncaptioned[:5])
        names += " …" if len(uncaptioned) > 5 else ""
        warn(f"{len(uncaptioned)} image(s) have no caption and use {fallback}: {names} "
             f"(`lora caption {folder}` writes captions)")
    return examples


def bucket_for(size: tuple[int, int], resolution: int, step: int,
               bucketing: bool = True) -> tuple[int, int] | None:
    """The (width, height) an image trains at; None when it is smaller than one step."""
    w, h = size
    if not bucketing:
        side = min(resolution, min(w, h)) // step * step
        return (side, side) if side else None
    scale = min(1.0, math.sqrt(resolution * resolution / (w * h)))
    bw, bh = int(w * scale) // step * step, int(h * scale) // step * step
    return (bw, bh) if bw and bh else None


def plan(examples: list[Example], resolution: int, step: int, bucketing: bool, repeats: int = 1,
         on_warning: Callable[[str], None] | None = None) -> Dataset:
    """Open every image once (corrupt ones are skipped with a warning) and bucket it."""
    warn = on_warning or (lambda _m: None)
    samples, order = [], []
    for ex in examples:
        try:
            with_size = load_rgb(ex.path).size
        except ImageError as e:
            warn(f"skipping {e.message}")
            continue
        bucket = bucket_for(with_size, resolution, step, bucketing)
        if bucket is None:
            warn(f"skipping {ex.path}: {with_size[0]}x{with_size[1]} is smaller than "
                 f"data.bucket_step ({step} px)")
            continue
        order += [len(samples)] * (ex.repeats * repeats)
        samples.append(Sample(ex, with_size, bucket))
    if not samples:
        raise LoraError("no usable images (all were unreadable or too small)",
                        "check the warnings above; replace or remove those files")
    return Dataset(samples, order)


def epoch_batches(dataset: Dataset, global_batch: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, a pure function of (seed, epoch).

    Each batch holds `global_batch` samples of one bucket (the last batch of a bucket is filled
    up from the start of that bucket), so every batch splits evenly over processes.
    """
    import numpy as np

    rng = np.random.default_rng([seed, epoch, 0x10CA])
    batches = []
    for _bucket, members in dataset.buckets.items():
        members = [members[i] for i in rng.permutation(len(members))]
        n = math.ceil(len(members) / global_batch)
        padded = (members * math.ceil(n * global_batch / len(members)))[: n * global_batch]
        batches += [padded[i * global_batch:(i + 1) * global_batch] for i in range(n)]
    return [batches[i] for i in rng.permutation(len(batches))]


def batches_per_epoch(dataset: Dataset, global_batch: int) -> int:
    return sum(math.ceil(len(m) / global_batch) for m in dataset.buckets.values())


def transform_caption(caption: str, rng, shuffle: bool, keep_tokens: int, dropout: float) -> str:
    """Caption dropout, then comma-separated tag shuffling with the first `keep_tokens` kept."""
    drop = rng.random() < dropout if dropout > 0 else False
    if drop:
        return ""
    if not shuffle:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    tail = [tail[i] for i in rng.permutation(len(tail))]
    return ", ".join(head + tail)


def geometry(sample: Sample, crop: str, rng=None) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized width, height), (crop top, left)): scaled (never up) to cover the bucket."""
    (w, h), (bw, bh) = sample.size, sample.bucket
    scale = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * scale)), max(bh, round(h * scale))
    if crop == "random" and rng is not None:
        top, left = int(rng.integers(0, rh - bh + 1)), int(rng.integers(0, rw - bw + 1))
    else:
        top, left = (rh - bh) // 2, (rw - bw) // 2
    return (rw, rh), (top, left)


def load_pixels(sample: Sample, resized: tuple[int, int], top_left: tuple[int, int], flip: bool):
    """The image resized, cropped to its bucket and maybe flipped, as a [-1, 1] CHW tensor."""
    import numpy as np
    import torch
    from PIL import Image

    image = load_rgb(sample.example.path)
    if resized != image.size:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    (top, left), (bw, bh) = top_left, sample.bucket
    image = image.crop((left, top, left + bw, top + bh))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def tag_frequency(examples: list[Example]) -> dict[str, dict[str, int]]:
    """{folder: {tag: count}} over comma-separated captions, as kohya's ss_tag_frequency."""
    freq: dict[str, Counter] = defaultdict(Counter)
    for ex in examples:
        for tag in (t.strip() for t in ex.caption.split(",")):
            if tag:
                freq[ex.folder][tag] += 1
    return {k: dict(v.most_common()) for k, v in sorted(freq.items())}


def fingerprint(examples: list[Example]) -> str:
    """Identity of a dataset: every image's path, size and mtime, and its caption."""
    import hashlib

    h = hashlib.sha256()
    for ex in sorted(examples, key=lambda e: str(e.path)):
        st = ex.path.stat()
        h.update(f"{ex.path}|{st.st_size}|{st.st_mtime_ns}|{ex.repeats}|{ex.caption}\n".encode())
    return h.hexdigest()


__all__ = ["Example", "Sample", "Dataset", "scan", "plan", "bucket_for", "epoch_batches",
           "batches_per_epoch", "transform_caption", "geometry", "load_pixels", "tag_frequency",
           "fingerprint", "is_image"]
