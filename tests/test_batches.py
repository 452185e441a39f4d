"""Micro-batches (loracli.training.batches): noise drawn in the latent's own shape, whatever the VAE, and
every draw a function of (seed, micro-batch, position in the global batch)."""

from __future__ import annotations

import types

import pytest
from train_fixtures import make_dataset

from loracli import profiles
from loracli.training import dataset as ds
from loracli.training.batches import Batches


def _model(channels: int, factor: int):
    """The part of denoiser.Model that Batches uses: a VAE of `channels` latents at 1/`factor`."""
    import torch

    def encode_pixels(pixels):
        n, _, h, w = pixels.shape
        return torch.full((n, channels, h // factor, w // factor), float(pixels.mean()))

    return types.SimpleNamespace(noise=types.SimpleNamespace(
        config=types.SimpleNamespace(num_train_timesteps=1000)), trained={"unet": None},
        encode_pixels=encode_pixels, device="cpu")


def _batches(tmp_path, model, batch_size, rank=0, processes=1, **train):
    data_dir = make_dataset(tmp_path / "data", n=4)
    overrides = [f"train.batch_size={batch_size}", "train.cache_latents=false",
                 "train.cache_text=false", "data.resolution=64", "data.flip=true"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    profile = profiles.load("default", overrides)
    data = ds.plan(ds.scan(data_dir), 64, 64, True)
    return Batches(data, profile, model, tmp_path / "cache", rank, processes, lambda _m: None)


@pytest.mark.parametrize("channels, factor", [(4, 8), (16, 2), (16, 8)])
def test_noise_has_the_shape_of_the_latent_it_noises(tmp_path, channels, factor):
    b = _batches(tmp_path, _model(channels, factor), 2, noise_offset=0.1)(0)
    assert b.latents.shape == (2, channels, 64 // factor, 64 // factor)
    assert b.noise.shape == b.latents.shape and b.timesteps.shape == (2,)
    assert b.noise.std() > 0.5 and len(b.captions) == 2 and b.text is None


def test_two_processes_draw_what_one_process_draws(tmp_path):
    import torch

    one = _batches(tmp_path, _model(4, 8), 4)
    halves = [_batches(tmp_path, _model(4, 8), 2, rank=r, processes=2) for r in (0, 1)]
    for micro in (0, 1, 5):
        whole, parts = one(micro), [h(micro) for h in halves]
        assert torch.equal(whole.noise, torch.cat([p.noise for p in parts]))
        assert torch.equal(whole.timesteps, torch.cat([p.timesteps for p in parts]))
        assert whole.captions == parts[0].captions + parts[1].captions
    assert not torch.equal(one(0).noise, one(1).noise)
