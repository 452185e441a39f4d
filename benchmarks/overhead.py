"""What the training loop costs beyond the model's own work, measured in one process.

    .venv/bin/python benchmarks/overhead.py                       # SD1.5 shape, 128 px, batch 2, rank 4
    .venv/bin/python benchmarks/overhead.py --steps 30 --model /tmp/sd15-shape   # reuse a built model
    .venv/bin/python benchmarks/overhead.py --model DIR --resolution 64   # any SD1 diffusers folder

The SD1.5-shaped model (real architecture, random weights; `train.py`'s builder) is trained by
the real `lora train` loop (`training.run`, default profile, fp32 on the CPU, latents and text
cached) while, after every one of its steps, a bare step runs on the same peft-injected UNet:
noise the same latents, UNet forward, MSE, backward, AdamW step — nothing else. The two
alternate, so a machine shared with other work slows both alike; the figures are medians, the
first steps (warm-up) and the last (it saves a checkpoint) left out, in wall time and in this
process's CPU time (steadier when other processes share the cores), with the median of each
step's ratio to the bare step run just before it. The loop's step time is the time between two
of its steps, so it counts everything the loop does per step.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _train_benchmark():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Bare:
    """One plain step on the trainer's own UNet and LoRA parameters: the compute floor.

    Its inputs have the shapes of the loop's (latents from the VAE config, the text encoder's
    output for a caption), so it also measures a checkout of lora that predates this benchmark.
    """

    def __init__(self, model, batch: int, resolution: int, lr: float, weight_decay: float):
        import torch

        self.model = model
        vae = model.vae.config
        side = resolution // 2 ** (len(vae.block_out_channels) - 1)
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn((batch, vae.latent_channels, side, side), generator=g)
        self.noise = torch.randn(self.latents.shape, generator=g)
        self.timesteps = torch.randint(0, model.noise.config.num_train_timesteps, (batch,),
                                       generator=g)
        with torch.no_grad():
            text = model.encode_text(["sks, red disc, blue background"] * batch)
        sizes = {k: torch.tensor([[resolution, resolution]] * batch, dtype=torch.float32)
                 for k in ("original_size", "target_size")}
        sizes["crop_top_left"] = torch.zeros((batch, 2))
        self.cond = model.family.conditioning(text, sizes)
        params = [p for p in model.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(self) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one bare step."""
        import torch.nn.functional as F

        w0, c0 = time.perf_counter(), time.process_time()
        noisy = self.model.noise.add_noise(self.latents, self.noise, self.timesteps)
        pred = self.model.unet(noisy, self.timesteps, **self.cond).sample
        loss = F.mse_loss(pred, self.noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - w0, time.process_time() - c0


def measure(base: Path, data: Path, out: Path, steps: int, batch: int, resolution: int,
            rank: int, warmup: int) -> dict:
    from loracli import profiles
    from loracli.training import denoiser
    from loracli.training import loop as training
    from loracli.training import runs

    overrides = [f"model.base='{base}'", f"data.dir='{data}'", f"data.resolution={resolution}",
                 f"train.max_steps={steps}", f"train.batch_size={batch}",
                 f"train.save_steps={steps}", f"train.output_dir='{out}'",
                 f"lora.rank={rank}", f"lora.alpha={rank}", "train.mixed_precision='no'",
                 "train.cache_latents=true", "train.cache_text=true"]
    profile = profiles.load("default", overrides)
    run_dir, _ = runs.start(profile, restart=True)

    seen = {}
    real_init = denoiser.Model.__init__

    def spy(self, *args, **kwargs):  # the benchmark's one hook: the model the loop trains
        real_init(self, *args, **kwargs)
        seen["bare"] = Bare(self, batch, resolution, profile.train.learning_rate,
                            profile.train.weight_decay)

    denoiser.Model.__init__ = spy
    loop, bare = [], []
    mark = {}

    def on_step(m: dict) -> None:
        now = (time.perf_counter(), time.process_time())
        if mark:
            loop.append((now[0] - mark["wall"], now[1] - mark["cpu"]))
        bare.append(seen["bare"].step())
        mark["wall"], mark["cpu"] = time.perf_counter(), time.process_time()

    try:
        training.run(run_dir, on_step=on_step)
    finally:
        denoiser.Model.__init__ = real_init
    # loop[i] is step i+2 (the window between two callbacks), bare[i] ran right after step i+1:
    # pair each loop step with the bare step just before it; drop warm-up and the last step
    pairs = list(zip(loop, bare))[max(0, warmup - 1):-1]
    out = {"steps_measured": len(pairs), "batch": batch, "resolution": resolution,
           "rank": rank, "threads": _threads()}
    for k, clock in enumerate(("wall", "cpu")):
        a = statistics.median(p[0][k] for p in pairs)
        b = statistics.median(p[1][k] for p in pairs)
        ratio = statistics.median(p[0][k] / p[1][k] for p in pairs)
        out[clock] = {"loop_s": round(a, 4), "bare_s": round(b, 4),
                      "overhead_pct": round(100 * (a - b) / b, 1),
                      "paired_overhead_pct": round(100 * (ratio - 1), 1),
                      "loop_steps": [round(p[0][k], 3) for p in pairs],
                      "bare_steps": [round(p[1][k], 3) for p in pairs]}
    return out


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--model", type=Path, help="an SD1.5-shaped folder to reuse (built "
                                                   "there when missing)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench = _train_benchmark()
    with tempfile.TemporaryDirectory(prefix="lora-overhead-") as tmp:
        tmp = Path(tmp)
        base = args.model or tmp / "sd15-shape"
        if not (base / "model_index.json").is_file():
            t0 = time.perf_counter()
            bench.build_sd15_shape(base)
            print(f"built the SD1.5-shaped model in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)
        data = bench.make_images(tmp / "data", args.resolution, 4)
        result = measure(base, data, tmp / "run", args.steps, args.batch, args.resolution,
                         args.rank, args.warmup)
    print(json.dumps(result))
    print(f"\n{result['steps_measured']} alternating steps, {result['threads']} threads, "
          f"{args.resolution} px, batch {args.batch}, rank {args.rank}")
    for clock in ("wall", "cpu"):
        r = result[clock]
        print(f"{clock:>4}: loop step {r['loop_s']:.3f} s   bare forward+backward+AdamW "
              f"{r['bare_s']:.3f} s   overhead {r['overhead_pct']:+.1f} % "
              f"(median of paired ratios {r['paired_overhead_pct']:+.1f} %)")


if __name__ == "__main__":
    main()
