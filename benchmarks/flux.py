"""FLUX.1 LoRA training speed and peak memory, with and without text-encoder caching.

    .venv/bin/python benchmarks/flux.py                          # the tiny FLUX.1-dev, CPU, seconds
    .venv/bin/python benchmarks/flux.py --shape real --resolution 512 --steps 6    # a GPU
    .venv/bin/python benchmarks/flux.py --shape real --layers 1 --resolution 128   # CPU smoke run

`--shape real` builds a FLUX.1-dev-shaped transformer from the real config (19 double and 38
single blocks, 3072 wide: 11.9B parameters, random weights, stored bf16) and the real 16-channel
VAE shape; its text encoders have the real output widths (CLIP-L 768, T5-XXL 4096) but one layer
each, since with caching they run once. `--layers N` cuts the blocks to N + 2N for a smoke run.
Each configuration runs in its own process, so the peak memory (CUDA allocator peak on a GPU,
peak RSS on the CPU) is that configuration's alone; steps/s is from the median step time after
the first; "held" is the memory held during the steps (after loading). With caching off,
the text encoders encode every step and stay in memory; with it on, captions are encoded once
to disk and the encoders are freed. Prints a table and JSON lines.
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


def build_real_shape(dest: Path, layers: int | None) -> Path:
    """A FLUX.1-dev-shaped diffusers folder with random weights (see the module docstring)."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                           FluxTransformer2DModel)
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config,
                              T5EncoderModel, T5TokenizerFast)

    from loracli import tiny, tiny_dit

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        transformer = FluxTransformer2DModel(
            num_layers=layers or 19, num_single_layers=2 * layers if layers else 38,
            guidance_embeds=True).to(torch.bfloat16)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16,
                        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                        use_post_quant_conv=False, sample_size=1024)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=1,
                                        max_position_embeddings=77, vocab_size=49408,
                                        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))
    t5_tokenizer = T5TokenizerFast.from_pretrained(tiny_dit.write_t5_tokenizer(dest / ".t5"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=1024,
                                 num_layers=1, num_heads=64, feed_forward_proj="gated-gelu",
                                 is_encoder_decoder=False))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**tiny_dit.SCHEDULERS["flux-dev"]), vae=vae,
        text_encoder=clip, tokenizer=CLIPTokenizer.from_pretrained(
            tiny.write_clip_tokenizer(dest / ".clip"), model_max_length=77),
        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer.cpu())
    pipe.save_pretrained(dest, safe_serialization=True)
    return dest


def one(base: str, data: str, out: str, steps: int, resolution: int, cache: bool) -> dict:
    """One configuration, in this process."""
    from loracli import families, profiles
    from loracli.training import loop as training
    from loracli.training import runs

    cuda = _cuda()
    targets = list(families.get("flux-dev").unet_targets)
    overrides = [f"model.base='{base}'", f"data.dir='{data}'", f"data.resolution={resolution}",
                 f"lora.targets={json.dumps(targets)}", "lora.dropout=0.0",
                 f"train.max_steps={steps}", "train.batch_size=1", f"train.save_steps={steps}",
                 f"train.output_dir='{out}'", f"train.cache_text={str(cache).lower()}",
                 "train.cache_latents=true", f"train.gradient_checkpointing={str(cuda).lower()}",
                 "train.mixed_precision='bf16'" if cuda else "train.mixed_precision='no'"]
    t0 = time.perf_counter()
    run_dir, _ = runs.start(profiles.load("default", overrides))
    rows, held = [], []

    def on_step(metrics):
        rows.append(metrics)
        held.append(_held_mib())

    result = training.run(run_dir, on_step=on_step)
    total = time.perf_counter() - t0
    step_s = statistics.median([r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]])
    return {"steps": result.step, "resolution": resolution, "text_cache": cache,
            "steps_per_s": round(1 / step_s, 3), "peak_memory_mib": rows[-1]["memory_mib"],
            "held_while_training_mib": round(max(held), 1),
            "wall_s": round(total, 1), "device": "cuda" if cuda else "cpu"}


def _held_mib() -> float:
    """Memory held now (CUDA allocated, else resident set): what training keeps, after loading."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--layers", type=int, help="real shape: N double + 2N single blocks")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(**json.loads(args.one))), flush=True)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    from train_fixtures import make_dataset

    from loracli import tiny_dit

    results = []
    with tempfile.TemporaryDirectory(prefix="lora-bench-flux-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        base = tiny_dit.build_tiny_dit(tmp / "base", "flux-dev") if args.shape == "tiny" \
            else build_real_shape(tmp / "base", args.layers)
        print(f"built the {args.shape} FLUX.1-dev in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr)
        data = make_dataset(tmp / "data", n=4)
        for cache in (False, True):
            plan = {"base": str(base), "data": str(data), "out": str(tmp / f"run-{cache}"),
                    "steps": args.steps, "resolution": args.resolution, "cache": cache}
            proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(plan)],
                                  capture_output=True, text=True, cwd=ROOT)
            if proc.returncode:
                sys.exit(proc.stderr[-3000:])
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"{'text cache':<11} {'steps/s':>8} {'peak MiB':>9} {'held MiB':>9} {'wall s':>7}  "
          "device")
    for r in results:
        print(f"{'on' if r['text_cache'] else 'off':<11} {r['steps_per_s']:>8} "
              f"{r['peak_memory_mib']:>9} {r['held_while_training_mib']:>9} {r['wall_s']:>7}  "
              f"{r['device']} {args.shape} {r['resolution']} px")
    for r in results:
        print(json.dumps({"shape": args.shape, **r}))


if __name__ == "__main__":
    main()
