"""What the training loop costs beyond the model's own work, measured in one process.

    .venv/bin/python benchmarks/overhead.py                       # SD1.5 shape, 128 px, batch 2, rank 4
    .venv/bin/python benchmarks/overhead.py --steps 30 --model /tmp/sd15-shape   # reuse a built model

The SD1.5-shaped model (real architecture, random weights; `train.py`'s builder) is trained by
the real `lora train` loop (`training.run`, default profile, fp32 on the CPU, latents and text
cached) while, after every one of its steps, a bare step runs on the same peft-injected UNet:
noise the same latents, UNet forward, MSE, backward, AdamW step — nothing else. The two
alternate, so a machine shared with other work slows both alike; the figures are medians, the
first steps (warm-up) and the last (it saves a checkpoint) left out. The loop's step time is the
wall time between two of its steps, so it counts everything the loop does per step.
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
    """One plain step on the trainer's own UNet and LoRA parameters: the compute floor."""

    def __init__(self, task, lr: float, weight_decay: float):
        import torch

        self.model = task.model
        batch = task.micro_batch(0)
        text = batch.text if batch.text is not None else task.model.encode_text(batch.captions)
        self.latents = batch.latents * task.model.scaling
        self.noise, self.timesteps = batch.noise, batch.timesteps
        self.cond = task.model.family.conditioning(text, batch.sizes)
        params = [p for p in task.model.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(self) -> float:
        import torch.nn.functional as F

        t0 = time.perf_counter()
        noisy = self.model.noise.add_noise(self.latents, self.noise, self.timesteps)
        pred = self.model.unet(noisy, self.timesteps, **self.cond).sample
        loss = F.mse_loss(pred, self.noise)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def measure(base: Path, data: Path, out: Path, steps: int, batch: int, resolution: int,
            rank: int, warmup: int) -> dict:
    from loracli import diffusion, profiles, runs, training

    overrides = [f"model.base='{base}'", f"data.dir='{data}'", f"data.resolution={resolution}",
                 f"train.max_steps={steps}", f"train.batch_size={batch}",
                 f"train.save_steps={steps}", f"train.output_dir='{out}'",
                 f"lora.rank={rank}", f"lora.alpha={rank}", "train.mixed_precision='no'",
                 "train.cache_latents=true", "train.cache_text=true"]
    profile = profiles.load("default", overrides)
    run_dir, _ = runs.start(profile, restart=True)

    seen = {}
    real_prepared = diffusion.DiffusionTask.prepared

    def spy(self, modules):  # the benchmark's one hook: the task the loop trains
        seen["bare"] = Bare(self, profile.train.learning_rate, profile.train.weight_decay)
        real_prepared(self, modules)

    diffusion.DiffusionTask.prepared = spy
    loop, bare = [], []
    mark = {"t": None}

    def on_step(m: dict) -> None:
        now = time.perf_counter()
        if mark["t"] is not None:
            loop.append(now - mark["t"])
        bare.append(seen["bare"].step())
        mark["t"] = time.perf_counter()

    try:
        training.run(run_dir, on_step=on_step)
    finally:
        diffusion.DiffusionTask.prepared = real_prepared
    # loop[i] is step i+2; drop warm-up steps and the last (it saves a checkpoint)
    loop_s = loop[max(0, warmup - 1):-1]
    bare_s = bare[warmup:-1]
    a, b = statistics.median(loop_s), statistics.median(bare_s)
    return {"loop_s": round(a, 4), "bare_s": round(b, 4),
            "overhead_pct": round(100 * (a - b) / b, 1), "steps_measured": len(loop_s),
            "loop_steps": [round(x, 3) for x in loop_s], "bare_steps": [round(x, 3) for x in bare_s],
            "batch": batch, "resolution": resolution, "rank": rank,
            "threads": _threads()}


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
    print(f"\nloop step {result['loop_s']:.3f} s   bare forward+backward+AdamW "
          f"{result['bare_s']:.3f} s   overhead {result['overhead_pct']:+.1f} %   "
          f"(medians of {result['steps_measured']} alternating steps, "
          f"{result['threads']} threads)")


if __name__ == "__main__":
    main()
