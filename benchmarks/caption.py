"""How fast `lora caption` labels a folder: images/s batched against one image at a time, and the
time the second run spends on label text embeddings (the on-disk cache should make it ~0).

Runs the real pipeline (`captioning.caption_folder`: decode, preprocess, encode, rank, write) on
synthetic JPEGs, with the tiny open_clip (`loracli.tiny`) and a random-weight ViT-B-32 built from
open_clip's own config (`pretrained=None`; no download). Run by hand:

    .venv/bin/python benchmarks/caption.py [--images 64] [--batch 16] [--models tiny,ViT-B-32]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, n: int, seed: int = 0) -> None:
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        w, h = rng.choice([(512, 512), (640, 480), (480, 640), (768, 512)])
        im = Image.new("RGB", (w, h), tuple(rng.randint(0, 255) for _ in range(3)))
        d = ImageDraw.Draw(im)
        for _ in range(12):
            x, y = rng.randint(0, w), rng.randint(0, h)
            d.ellipse([x, y, x + rng.randint(20, 200), y + rng.randint(20, 200)],
                      fill=tuple(rng.randint(0, 255) for _ in range(3)))
        im.save(folder / f"img_{i:04d}.jpg", quality=90)


def build(name: str, workdir: Path):
    import open_clip
    import torch

    from loracli import tiny
    from loracli.captioning import clipmodel

    torch.manual_seed(0)
    if name == "tiny":
        folder = tiny.build_tiny_open_clip(workdir / "tiny-open-clip")
        return clipmodel.load("tiny", f"local-dir:{folder}", device="cpu")
    net, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    net.eval()
    return clipmodel.ClipModel(net, preprocess, open_clip.get_tokenizer(name),
                               identity=f"{name}|random-seed-0|fp32", device="cpu",
                               dtype=torch.float32)


def run(folder: Path, clip, batch: int) -> dict:
    from loracli.captioning import job as captioning

    options = captioning.Options(existing="overwrite", batch_size=batch)
    return captioning.caption_folder(folder, options, clip=clip)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--models", default="tiny,ViT-B-32")
    args = ap.parse_args()

    import torch

    work = Path(tempfile.mkdtemp(prefix="lora-caption-bench-"))
    os.environ["LORA_HOME"] = str(work / "home")  # an empty text-embedding cache
    os.environ["LORA_CACHE"] = str(work / "cache")
    folder = work / "images"
    make_images(folder, args.images)
    print(f"{args.images} JPEGs (512-768 px), default label bank, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'model':10} {'run':34} {'images/s':>9} {'text s':>8} {'text cache':>12}")
    for name in args.models.split(","):
        clip = build(name, work)
        rows = [("1st, batch %d (cold text cache)" % args.batch, args.batch),
                ("2nd, batch %d" % args.batch, args.batch),
                ("3rd, one image at a time", 1)]
        for label, batch in rows:
            t = time.perf_counter()
            result = run(folder, clip, batch)
            wall = time.perf_counter() - t
            timings, cache = result["timings"], result["text_cache"]
            ips = result["captioned"] / timings["images_s"]
            print(f"{name:10} {label:34} {ips:9.2f} {timings['text_s']:8.3f} "
                  f"{cache['hits']:>5} hit {cache['misses']:>2} miss  ({wall:.1f} s total)")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
