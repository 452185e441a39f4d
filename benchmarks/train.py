"""Training speed and peak memory: the tiny SD1 model and a UNet of SD1.5's real shape.

    .venv/bin/python benchmarks/train.py                 # both models, caching on and off
    .venv/bin/python benchmarks/train.py --only tiny     # seconds
    .venv/bin/python benchmarks/train.py --steps 5 --resolution 256

The SD1.5-shaped model has random weights (UNet 860M parameters, CLIP-L text encoder, the SD VAE),
built once into a temporary folder. Each configuration runs in its own process, so the peak
memory (CUDA allocator peak on a GPU, peak RSS on the CPU) is that configuration's alone.
Steps/s is from the median step time, leaving out the first step (warm-up). Prints a table and
one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_sd15_shape(dest: Path) -> Path:
    """A diffusers folder with SD1.5's architecture and random weights."""
    import torch
    from diffusers import (AutoencoderKL, DDPMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from loracli import tiny

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                        sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12,
                                        max_position_embeddings=77, vocab_size=49408,
                                        hidden_act="quick_gelu", bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    tok_dir = tiny.write_clip_tokenizer(dest / ".tok")
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77),
        unet=unet, scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                           beta_end=0.012, clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def make_images(folder: Path, size: int, n: int = 4) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        im = Image.new("RGB", (size, size), (20, 40, 200))
        x = size * i // (2 * n)
        ImageDraw.Draw(im).ellipse([x, x, x + size // 2, x + size // 2], fill=(230, 30, 30))
        im.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text("sks, red disc, blue background", "utf-8")
    return folder


def one(base: str, data: str, out: str, steps: int, batch: int, resolution: int, cache: bool) -> dict:
    """One configuration, in this process."""
    from loracli import profiles
    from loracli.training import loop as training
    from loracli.training import runs

    overrides = [f"model.base='{base}'", f"data.dir='{data}'", f"data.resolution={resolution}",
                 f"train.max_steps={steps}", f"train.batch_size={batch}",
                 f"train.save_steps={steps}", f"train.output_dir='{out}'",
                 f"train.cache_latents={str(cache).lower()}", f"train.cache_text={str(cache).lower()}",
                 "train.mixed_precision='bf16'" if _cuda() else "train.mixed_precision='no'"]
    t0 = time.perf_counter()
    run_dir, _ = runs.start(profiles.load("default", overrides))
    rows = []
    result = training.run(run_dir, on_step=rows.append)
    total = time.perf_counter() - t0
    step_s = statistics.median([r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]])
    return {"steps": result.step, "batch": batch, "resolution": resolution, "cache": cache,
            "steps_per_s": round(1 / step_s, 3), "images_per_s": round(batch / step_s, 3),
            "peak_memory_mib": rows[-1]["memory_mib"], "wall_s": round(total, 1),
            "device": "cuda" if _cuda() else "cpu"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("tiny", "sd15"))
    parser.add_argument("--steps", type=int, default=4, help="steps for the SD1.5-shaped model")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(**json.loads(args.one))), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        tmp = Path(tmp)
        plans = []
        if args.only in (None, "tiny"):
            from loracli import tiny

            base = tiny.build_tiny_sd(tmp / "tiny", "sd1")
            data = make_images(tmp / "data64", 64, 8)
            plans += [("tiny sd1 @64", dict(base=str(base), data=str(data), steps=30, batch=4,
                                            resolution=64))]
        if args.only in (None, "sd15"):
            t0 = time.perf_counter()
            base = build_sd15_shape(tmp / "sd15-shape")
            print(f"built the SD1.5-shaped model in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
            data = make_images(tmp / f"data{args.resolution}", args.resolution, 4)
            plans += [(f"sd15-shape @{args.resolution}",
                       dict(base=str(base), data=str(data), steps=args.steps, batch=1,
                            resolution=args.resolution))]
        for label, plan in plans:
            for cache in (True, False):
                job = dict(plan, out=str(tmp / f"out-{len(results)}"), cache=cache)
                proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(proc.stderr[-3000:])
                row = {"model": label, **json.loads(proc.stdout.splitlines()[-1])}
                results.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'model':<18}{'cache':<7}{'steps/s':>9}{'img/s':>8}{'peak MiB':>10}{'device':>8}")
    for r in results:
        print(f"{r['model']:<18}{'on' if r['cache'] else 'off':<7}{r['steps_per_s']:>9.3f}"
              f"{r['images_per_s']:>8.2f}{r['peak_memory_mib']:>10.0f}{r['device']:>8}")


if __name__ == "__main__":
    main()
