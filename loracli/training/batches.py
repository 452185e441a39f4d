"""The inputs of one diffusion micro-batch: a pure function of (seed, micro-batch index).

Every image's random choices (caption shuffle and dropout, crop, flip, noise, timestep) come from
generators seeded by (seed, micro-batch, its position in the global batch), so 1 process × batch
4 and 2 processes × batch 2 draw the same numbers, and a resumed run draws what the
uninterrupted one would have. The noise is drawn in the shape of the latent it noises, whatever
the VAE's channels and downsampling.

Latents (VAE posterior means) and text embeddings are encoded once and kept in memory when the
profile caches them (`train.cache_latents`, `train.cache_text`); the on-disk caches of
`loracli.training.caching` make the next run of the same data start fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli import profiles
from loracli.training import dataset as ds
from loracli.training.denoiser import Model, seed_from


@dataclass
class Batch:
    latents: object          # (B, C, h, w) float32, unscaled
    noise: object            # like latents
    timesteps: object        # (B,) int64
    sizes: dict              # SDXL size conditioning: original_size, crop_top_left, target_size
    captions: list[str]
    text: dict | None        # cached text-encoder outputs for the captions, or None: encode them


class Batches:
    """`batches(micro)` → the `Batch` of micro-batch `micro` on this process."""

    def __init__(self, data: ds.Dataset, profile: profiles.Profile, model: Model, cache_root: Path,
                 rank: int, processes: int, warn: Callable[[str], None],
                 status: Callable[[str], None] = lambda _m: None):
        self.data, self.model = data, model
        self.d, self.t, self.seed = profile.data, profile.train, profile.train.seed
        self.local = profile.train.batch_size
        self.rank, self.global_batch = rank, self.local * processes
        self.per_epoch = ds.batches_per_epoch(data, self.global_batch)
        self.timesteps = model.noise.config.num_train_timesteps
        self._epoch: tuple[int, list] | None = None
        self.crop = self.d.crop
        self.latents: dict | None = None
        self.text: dict | None = None
        if self.t.cache_latents:
            if self.crop == "random":
                warn("data.crop = random needs train.cache_latents = false; using center crops")
                self.crop = "center"
            self.latents = self._cache_latents(cache_root, profile.model.vae, status)
        if self.t.cache_text and not model.trains_text and not self.d.shuffle_captions:
            self.text = self._cache_text(cache_root, status)

    def _cache_latents(self, cache_root: Path, vae: str, status) -> dict:
        from loracli.training import caching

        cache = caching.LatentCache(cache_root, caching.model_fingerprint(
            self.model.base.path, ("vae",)) + vae)
        flips = (False, True) if self.d.flip else (False,)
        todo = [(i, s, f) for i, s in enumerate(self.data.samples) for f in flips]
        out = {}
        for n, (i, sample, flip) in enumerate(todo):
            status(f"caching latents {n}/{len(todo)}")
            out[(i, flip)] = cache.get(sample, flip, self._encode_one)
        return out

    def _cache_text(self, cache_root: Path, status) -> dict:
        from loracli.training import caching

        model = self.model
        cache = caching.TextCache(cache_root, caching.model_fingerprint(
            model.base.path, model.family.text_encoders + model.family.tokenizers))
        captions = {s.example.caption for s in self.data.samples}
        if self.d.caption_dropout > 0:
            captions.add("")
        out = {}
        for n, caption in enumerate(sorted(captions)):
            status(f"caching text {n}/{len(captions)}")
            out[caption] = cache.get(caption, model.encode_text)
        return out

    def _encode_one(self, sample: ds.Sample, flip: bool):
        resized, top_left = ds.geometry(sample, "center")
        return self.model.encode_pixels(ds.load_pixels(sample, resized, top_left, flip)[None])[0]

    def position(self, micro: int) -> tuple[int, int]:
        """(epoch, batch index in the epoch) of micro-batch `micro`."""
        return divmod(micro, self.per_epoch)

    def __call__(self, micro: int) -> Batch:
        import numpy as np
        import torch

        epoch, index = self.position(micro)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, ds.epoch_batches(self.data, self.global_batch, self.seed, epoch))
        batch = self._epoch[1][index]
        positions = range(self.rank * self.local, (self.rank + 1) * self.local)
        captions, latents, pixels, sizes = [], [], [], []
        for j in positions:
            sample_index = batch[j]
            sample = self.data.samples[sample_index]
            aug = np.random.default_rng([self.seed, micro, j, 0])
            captions.append(ds.transform_caption(sample.example.caption, aug,
                                                 self.d.shuffle_captions, self.d.keep_tokens,
                                                 self.d.caption_dropout))
            flip = bool(self.d.flip and aug.random() < 0.5)
            resized, top_left = ds.geometry(sample, self.crop, aug)
            if self.latents is not None:
                latents.append(self.latents[(sample_index, flip)])
            else:
                pixels.append(ds.load_pixels(sample, resized, top_left, flip))
            (bw, bh), (w, h) = sample.bucket, sample.size
            sizes.append(((h, w), top_left, (bh, bw)))
        if self.latents is None:
            latents = list(self.model.encode_pixels(torch.stack(pixels)))
        noise, timesteps = [], []
        for j, latent in zip(positions, latents):
            g = torch.Generator().manual_seed(seed_from(self.seed, micro, j, 1))
            n = torch.randn(latent.shape, generator=g)
            if self.t.noise_offset:
                n = n + self.t.noise_offset * torch.randn((latent.shape[0], 1, 1), generator=g)
            noise.append(n)
            timesteps.append(torch.randint(0, self.timesteps, (1,), generator=g))
        text = None
        if self.text is not None:
            text = {k: torch.stack([self.text[c][k] for c in captions])
                    for k in self.text[captions[0]]}
        size_tensors = {name: torch.tensor([s[i] for s in sizes], dtype=torch.float32)
                        for i, name in enumerate(("original_size", "crop_top_left", "target_size"))}
        return Batch(torch.stack(latents), torch.stack(noise), torch.cat(timesteps), size_tensors,
                     captions, text)
