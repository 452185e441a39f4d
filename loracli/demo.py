"""`lora demo`: the main job end to end on the embedded tiny model, offline, in about two minutes.

Fetch (the tiny model is built into the model cache, no network) → a synthetic dataset with
captions → train with the `demo` profile → export a WebUI-layout `.safetensors` → a before/after
grid from the same seeds and the loss curve. Each step is the same library call the real
commands make; the demo adds nothing the user's own runs would not do.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from loracli import atomic, profiles
from loracli.errors import LoraError

MARKER = ".lora-demo"
IMAGES = 12
SIZE = 64
CAPTION = "sks, a red circle on a light background"
SEEDS = (1, 2, 3, 4)
GRID = "before_after.png"  # written last: a demo folder without it has a run to continue


@dataclass
class DemoResult:
    folder: Path
    dataset: Path
    run: Path
    lora: Path | None
    loss_plot: Path
    grid: Path | None
    snippet: str
    base_loss: float | None
    lora_loss: float | None
    steps: int
    status: str = "finished"          # or "interrupted" (Ctrl+C saved a checkpoint)
    resumed_from: int | None = None   # the step a continued demo started from
    seconds: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def make_dataset(folder: Path, count: int = IMAGES, size: int = SIZE, seed: int = 0) -> list[Path]:
    """Red discs of varied size and place on varied light backgrounds, each with a caption file.

    The captions are written by the demo, not by `lora caption`: a tiny random CLIP has nothing
    true to say about a picture.
    """
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(count):
        bg = tuple(rng.randint(205, 245) for _ in range(3))
        im = Image.new("RGB", (size, size), bg)
        r = rng.randint(size // 5, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        red = (rng.randint(200, 235), rng.randint(20, 50), rng.randint(20, 50))
        ImageDraw.Draw(im).ellipse((cx - r, cy - r, cx + r, cy + r), fill=red)
        path = folder / f"circle_{i:02d}.png"
        im.save(path)
        atomic.write_text(path.with_suffix(".txt"), CAPTION + "\n")
        written.append(path)
    return written


def start_or_continue(folder: Path, profile, write_data: Callable[[], None],
                      on_warning: Callable[[str], None] | None = None, last: str = GRID):
    """The demo's run as a `jobs.Job`: a run in `folder` stopped before its `last` file, with the
    same settings, is continued; otherwise the folder is (re)made, `write_data()` fills it, and a
    run starts."""
    from loracli.training import jobs, launch
    from loracli.training import loop as training

    run_dir, resumed = None, False
    if unfinished(folder, last):
        try:
            run_dir, resumed = training.start(profile, restart=False, on_warning=on_warning)
        except LoraError:  # other settings this time (--steps): start the demo again
            run_dir = None
    if run_dir is None:
        prepare_folder(folder)
        write_data()
        run_dir, resumed = training.start(profile, restart=False, on_warning=on_warning)
    return jobs.Job(run_dir, launch.Layout(), resumed,
                    jobs.newest_step(run_dir) if resumed else 0, str(run_dir))


def prepare_folder(folder: Path) -> None:
    """Use `folder` for the demo; replace a previous demo there, never anything else."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise LoraError(f"{folder} exists and was not made by `lora demo`",
                            "pass an empty or new folder: `lora demo --output lora-demo-2`")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("made by `lora demo`; `lora demo` may replace this folder\n")


def unfinished(folder: Path, last: str = GRID) -> bool:
    """A demo stopped before its last file (the grid): its run is continued, not replaced."""
    folder = Path(folder)
    return ((folder / MARKER).is_file() and (folder / "run" / "run.json").is_file()
            and not (folder / last).is_file())


def run(folder: Path, on_step: Callable[[dict], None] | None = None,
        on_stage: Callable[[str], None] | None = None,
        on_warning: Callable[[str], None] | None = None, stop=None,
        max_steps: int | None = None, on_start: Callable[[dict], None] | None = None,
        on_status: Callable[[str], None] | None = None) -> DemoResult:
    """The whole demo; returns where everything is. Never touches the network.

    A demo stopped by Ctrl+C returns with status "interrupted"; running it again on the same
    folder continues its run from the last checkpoint and ends with the grid.
    """
    import time

    from loracli.exporting import export
    from loracli.hub import models
    from loracli.training import jobs
    from loracli.training import loop as training

    stage = on_stage or (lambda _m: None)
    folder = Path(folder).resolve()
    seconds = {}
    t = time.perf_counter()

    stage("fetch: building the tiny model into the model cache (offline, deterministic)")
    base = models.install_tiny("tiny-sd")
    seconds["fetch"] = round(time.perf_counter() - t, 1)

    data = folder / "data"
    overrides = [f"data.dir={_toml_str(data)}", f"train.output_dir={_toml_str(folder / 'run')}"]
    if max_steps:
        overrides.append(f"train.max_steps={max_steps}")
    profile = profiles.load("demo", overrides)
    def write_data() -> None:
        make_dataset(data)
        stage(f"data: {IMAGES} pictures of red discs with captions \"{CAPTION}\" in {data}")

    job = start_or_continue(folder, profile, write_data, on_warning)
    run_dir, resumed = job.run_dir, job.resumed
    if resumed:
        stage(f"train: continuing the demo's run from step {job.start_step}")
    else:
        stage(f"train: {profile.train.max_steps} steps of LoRA rank {profile.lora.rank} "
              f"on {profile.model.base} (profile `demo`)")
    t = time.perf_counter()
    result = jobs.train(job, on_step=on_step, on_warning=on_warning, stop=stop,
                        on_start=on_start, on_status=on_status)
    seconds["train"] = round(time.perf_counter() - t, 1)
    done = dict(folder=folder, dataset=data, run=run_dir, loss_plot=run_dir / "loss.png",
                snippet="<lora:demo:0.8>", steps=result.step,
                resumed_from=job.start_step if resumed else None, seconds=seconds)
    if result.status == "interrupted":
        return DemoResult(lora=None, grid=None, base_loss=None, lora_loss=None,
                          status="interrupted", **done)

    t = time.perf_counter()
    exported = export.export(run_dir, format="kohya", name="demo", force=True)
    lora_file = Path(exported.path)
    stage(f"export: {lora_file}")
    base_loss = training.evaluate(run_dir, use_lora=False, draws=4)
    lora_loss = training.evaluate(run_dir, use_lora=True, draws=4)
    grid = folder / GRID
    before_after_grid(base, lora_file, data, profile.sample.prompts[0], grid)
    seconds["export+grid"] = round(time.perf_counter() - t, 1)
    return DemoResult(lora=lora_file, grid=grid, base_loss=round(base_loss, 4),
                      lora_loss=round(lora_loss, 4), **done)


def _toml_str(path: Path) -> str:
    return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'


def before_after_grid(base: Path, lora_file: Path, data: Path, prompt: str, out: Path,
                      scale: int = 3) -> Path:
    """Rows: training pictures as the tiny VAE sees them, the base model, the base + LoRA at
    strength 0.8 — the two generated rows from the same seeds."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image, ImageDraw

    diffusers_logging.set_verbosity_error()  # "no LoRA keys for the text encoder" is expected here
    pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def generate() -> list:
        images = []
        for seed in SEEDS:
            g = torch.Generator().manual_seed(seed)
            images += pipe(prompt, num_inference_steps=25, guidance_scale=3.0, height=SIZE,
                           width=SIZE, generator=g).images
        return images

    with torch.no_grad():
        training_pics = sorted(data.glob("*.png"))[: len(SEEDS)]
        recon = []
        for p in training_pics:
            x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
            x = (x / 127.5 - 1).permute(2, 0, 1)[None]
            y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
            arr = ((y[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            recon.append(Image.fromarray(arr))
        before = generate()
        pipe.load_lora_weights(str(lora_file), adapter_name="demo")
        pipe.set_adapters(["demo"], adapter_weights=[0.8])
        after = generate()

    rows = [("your pictures through the tiny VAE", recon), ("base model", before),
            ("base + <lora:demo:0.8>", after)]
    cell, label_h, pad = SIZE * scale, 14, 4
    width = len(SEEDS) * (cell + pad) + pad
    grid = Image.new("RGB", (width, len(rows) * (cell + label_h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    y = pad
    for label, images in rows:
        draw.text((pad, y), label, fill="black")
        y += label_h
        for i, im in enumerate(images):
            grid.paste(im.resize((cell, cell), Image.NEAREST), (pad + i * (cell + pad), y))
        y += cell + pad
    buffer = out.with_suffix(".tmp.png")
    grid.save(buffer)
    buffer.replace(out)
    return out

