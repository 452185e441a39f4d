"""The base model with LoRA layers: loading, the denoising loss, sample images, evaluation.

`Model` is what the training loop trains and what `evaluate` scores; the family interface
(`loracli.families`) supplies everything model-specific, so nothing here branches on a family.
"""

from __future__ import annotations

import math
from pathlib import Path

from loracli import atomic, families, profiles
from loracli.errors import LoraError
from loracli.families import loading
from loracli.training import checkpoints
from loracli.training import quantize as q
from loracli.training import dataset as ds
from loracli.training import runs

ADAPTER = "default"  # peft adapter name ("train" would shadow nn.Module.train)


def seed_from(*parts: int) -> int:
    import numpy as np

    return int(np.random.default_rng(list(parts)).integers(2**62))


def lora_config(rank, alpha, dropout, targets, rslora, dora):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                      use_rslora=rslora, use_dora=dora, init_lora_weights=True)


class Model:
    """The base model with LoRA layers, ready for the loss; shared by `run` and `evaluate`."""

    def __init__(self, run_dir: Path, profile: profiles.Profile, device, weight_dtype):
        import torch
        from peft import inject_adapter_in_model

        info = runs.info(run_dir)
        self.base = loading.Base.from_dict(info["base"])
        self.family = families.get(self.base.family)
        self.prediction = self.base.prediction_type
        self.objective = self.family.objective(self.prediction)
        quantize = profile.model.quantize
        parts = loading.load_components(self.base, self.family, profile.model.vae, quantize,
                                        weight_dtype)
        self.denoiser = self.family.denoiser  # "unet" or "transformer": its adapter's name
        self.unet, self.vae = parts[self.denoiser], parts["vae"]
        self.encoders = [parts[n] for n in self.family.text_encoders]
        self.tokenizers = [parts[n] for n in self.family.tokenizers]
        self.noise = self.objective.scheduler(parts["scheduler"].config)  # the training schedule
        self.parts = parts  # the loaded components by name, for sample pipelines
        self.geometry = self.family.geometry(self.vae.config, self.unet.config,
                                             profile.model.vae or str(self.base.path))
        self.device, self.weight_dtype = device, weight_dtype
        lo = profile.lora
        self.configs = {self.denoiser: lora_config(lo.rank, lo.alpha, lo.dropout, lo.targets,
                                                   lo.rslora, lo.dora)}
        if lo.train_text_encoder:
            for name in self.family.trainable[1:]:  # the encoders that can carry a LoRA
                self.configs[name] = lora_config(lo.rank, lo.alpha, lo.dropout,
                                                 lo.text_encoder_targets, lo.rslora, lo.dora)
        self.trained = {}
        # LoRA A matrices start random: the same seed gives the same start
        torch.manual_seed(seed_from(profile.train.seed, 3))
        for module in (self.unet, self.vae, *self.encoders):
            module.requires_grad_(False)
            if not q.is_quantized(module):  # 4-bit weights are placed when loaded
                module.to(device)
            if weight_dtype != torch.float32 and not q.is_quantized(module):
                module.to(dtype=weight_dtype)
        q.store(self.unet, quantize, weight_dtype)  # fp8: stored in float8, upcast per layer
        for name, config in self.configs.items():
            module = parts[name]
            inject_adapter_in_model(config, module, adapter_name=ADAPTER)
            for p in module.parameters():
                if p.requires_grad:  # LoRA weights train in fp32 whatever the base dtype
                    p.data = p.data.to(torch.float32)
            self.trained[name] = module

    @property
    def trains_text(self) -> bool:
        """Whether a text encoder gets a LoRA (then its outputs cannot be cached)."""
        return any(name in self.trained for name in self.family.text_encoders)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The latent of a height × width image: what the noise for it must look like."""
        return self.geometry.latent_shape(height, width)

    def bucket_step(self, requested: int, warn=lambda _m: None) -> int:
        """`data.bucket_step`, raised to a multiple of what the VAE and the UNet divide by."""
        multiple = self.geometry.pixel_multiple
        step = requested * multiple // math.gcd(requested, multiple)
        if step != requested:
            warn(f"data.bucket_step = {requested} is not a multiple of {multiple} px (the VAE "
                 f"downsamples {self.geometry.downsample}x, the UNet "
                 f"{self.geometry.denoiser_multiple}x more); using {step}")
        return step

    def adapter_state(self, unwrap) -> dict:
        from peft import get_peft_model_state_dict

        return {name: (get_peft_model_state_dict(unwrap(m), adapter_name=ADAPTER),
                       self.configs[name]) for name, m in self.trained.items()}

    def load_adapters(self, adapters: dict) -> None:
        from peft import set_peft_model_state_dict

        for name, sd in adapters.items():
            result = set_peft_model_state_dict(self.trained[name], sd, adapter_name=ADAPTER)
            if getattr(result, "unexpected_keys", None):
                raise LoraError(f"checkpoint {name} adapter does not fit this model "
                                f"({len(result.unexpected_keys)} unknown keys)")

    def release_text_encoders(self) -> None:
        """Drop the frozen text encoders once their outputs are cached (FLUX's T5-XXL is 9 GB in
        bf16): nothing here holds them afterwards, so their memory is freed."""
        import gc

        frozen = [n for n in self.family.text_encoders if n not in self.trained]
        if len(frozen) < len(self.family.text_encoders):
            return  # a trained encoder encodes every step: keep them all
        for name in frozen:
            self.parts[name] = None
        self.encoders = []
        gc.collect()

    def encode_text(self, captions: list[str]) -> dict:
        return self.family.encode(self.encoders, self.tokenizers, captions, self.device)

    def encode_pixels(self, pixels):
        import torch

        with torch.no_grad():
            latent = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return latent.float()

    def loss(self, unet, latents, text, sizes, noise, timesteps, min_snr_gamma: float):
        """Per-sample denoising MSE (min-SNR weighted when asked), averaged."""
        import torch.nn.functional as F

        latents = self.geometry.to_model(latents.to(self.device))
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy, target = self.objective.noisy_input_and_target(latents, noise, timesteps,
                                                              self.noise)
        cond = self.family.conditioning(text, sizes)
        pred = self.family.forward(unet, noisy.to(self.weight_dtype),
                                   self.objective.model_timesteps(timesteps, self.noise), cond)
        per = F.mse_loss(pred.float(), target.float(), reduction="none")
        per = per.mean(dim=tuple(range(1, per.dim())))
        weights = self.objective.weights(timesteps, self.noise, min_snr_gamma)
        if weights is not None:
            per = per * weights
        return per.mean()


def render_samples(model: Model, profile: profiles.Profile, run_dir: Path, step: int,
                   unwrap=lambda m: m) -> list[Path]:
    """Images for the profile's sample prompts with the LoRA as it is now: samples/step-N-i.png.

    The pipeline is built from the components in memory (whatever the family's pipeline class
    needs; optional parts left empty). Seeded generators only: the training RNG is untouched.
    """
    import inspect
    import io

    import diffusers
    import torch

    multiple = model.geometry.pixel_multiple
    s, res = profile.sample, max(profile.data.resolution // multiple, 1) * multiple
    cls = getattr(diffusers, model.family.pipeline)
    parts = {**model.parts, model.denoiser: unwrap(model.unet)}
    for name in model.trained:
        parts[name] = unwrap(model.trained[name])
    params = inspect.signature(cls.__init__).parameters
    kwargs = {n: parts.get(n) for n, p in params.items()
              if n != "self" and (n in parts or p.default is inspect.Parameter.empty)}
    for flag in ("requires_safety_checker", "add_watermarker"):
        if flag in params:
            kwargs[flag] = False
    pipe = cls(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    moved = [m for m in (model.vae, *(parts[n] for n in model.family.text_encoders))
             if m.device != model.device]
    for m in moved:
        m.to(model.device)
    trained = [unwrap(m) for m in model.trained.values()]
    for m in trained:
        m.eval()
    paths = []
    try:
        with torch.no_grad():
            for i, prompt in enumerate(s.prompts):
                g = torch.Generator("cpu").manual_seed(s.seed + i)
                image = pipe(prompt, num_inference_steps=s.steps, guidance_scale=s.guidance,
                             generator=g, height=res, width=res).images[0]
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                path = Path(run_dir) / "samples" / f"step-{step:06d}-{i:02d}.png"
                atomic.write_bytes(path, buf.getvalue())
                paths.append(path)
    finally:
        for m in trained:
            m.train()
        for m in moved:
            m.to("cpu")
    return paths


def evaluate(run_dir: Path, step: int | None = None, use_lora: bool = True, draws: int = 8,
             seed: int = 1234) -> float:
    """Mean denoising loss over the run's images with fixed noise and timesteps.

    With `use_lora=False` the adapter stays at its initial value (lora_B = 0), which is the base
    model exactly; comparing the two shows what training changed.
    """
    import torch

    run_dir = Path(run_dir)
    profile = runs.load_profile(run_dir)
    d = profile.data
    model = Model(run_dir, profile, torch.device("cpu"), torch.float32)
    data = ds.plan(ds.scan(d.dir, d.caption_ext, d.trigger), d.resolution,
                   model.bucket_step(d.bucket_step), d.bucketing)
    if use_lora:
        model.load_adapters(checkpoints.load_adapters(runs.latest(run_dir, step).path))
    for module in model.trained.values():
        module.eval()
    T = model.noise.config.num_train_timesteps
    total, count = 0.0, 0
    with torch.no_grad():
        for i, sample in enumerate(data.samples):
            resized, top_left = ds.geometry(sample, "center")
            latent = model.encode_pixels(ds.load_pixels(sample, resized, top_left, False)[None])
            text = model.encode_text([sample.example.caption])
            (bw, bh), (w, h) = sample.bucket, sample.size
            sizes = {"original_size": torch.tensor([[h, w]], dtype=torch.float32),
                     "crop_top_left": torch.tensor([top_left], dtype=torch.float32),
                     "target_size": torch.tensor([[bh, bw]], dtype=torch.float32)}
            for k in range(draws):
                g = torch.Generator().manual_seed(seed_from(seed, i, k))
                noise = torch.randn(latent.shape, generator=g)
                timesteps = torch.randint(0, T, (1,), generator=g)
                total += model.loss(model.unet, latent, text, sizes, noise, timesteps, 0.0).item()
                count += 1
    return total / count
