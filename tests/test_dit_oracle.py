"""Oracle: the loss of `lora train`'s first FLUX.1-dev step, recomputed the way diffusers'
`train_dreambooth_lora_flux.py` computes it, with diffusers' own pieces written out here.

The only random draws left (one 64 px image, no flips, no dropout) are σ and the noise. The test
records what the transformer was given and reads σ back from the timestep; the noise follows
from the noisy input and the reference's own latent (ε = (x_σ − (1 − σ)·x₀) / σ). The reference
then builds everything else itself — the VAE latent with FLUX's shift and scale, FluxPipeline's
packing and image ids, `encode_prompt`'s text states, guidance 3.5 — and its flow-matching loss
(target ε − x₀) must be the loss the trainer logged: a wrong shift or scale, packing, target,
guidance or text conditioning changes it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dit_fixtures import tiny_dit_folder
from PIL import Image
from train_fixtures import write_profile

from loracli import families, profiles
from loracli.training import loop as training
from loracli.training import runs

pytestmark = pytest.mark.slow

CAPTION = "sks, a red square"


def test_first_flux_step_loss_is_the_reference_flow_matching_loss(tmp_path, tmp_path_factory):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    base = tiny_dit_folder(tmp_path_factory, "flux-dev")
    data = tmp_path / "data"
    data.mkdir()
    image = Image.new("RGB", (64, 64), (20, 40, 200))
    image.paste((230, 30, 30), (8, 16, 40, 48))
    image.save(data / "a.png")
    (data / "a.txt").write_text(CAPTION, "utf-8")
    path = write_profile(tmp_path / "p.toml", base, data, tmp_path / "out",
                         lora={"dropout": 0.0,
                               "targets": list(families.get("flux-dev").unet_targets)},
                         train={"max_steps": 1, "save_steps": 1, "batch_size": 1})
    calls, real = [], FluxTransformer2DModel.forward

    def spy(module, *args, **kwargs):
        calls.append({k: v.detach().clone() if torch.is_tensor(v) else v
                      for k, v in kwargs.items()})
        return real(module, *args, **kwargs)

    run_dir, _ = runs.start(profiles.load(str(path)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FluxTransformer2DModel, "forward", spy)
        assert training.run(run_dir).status == "finished"
    logged = json.loads((run_dir / "logs" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    (call,) = calls

    pipe = FluxPipeline.from_pretrained(base, local_files_only=True)
    vae = pipe.vae.config
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
    with torch.no_grad():
        latent = pipe.vae.encode(pixels[None]).latent_dist.mean
    x0 = FluxPipeline._pack_latents((latent - vae.shift_factor) * vae.scaling_factor, 1, 16, 8, 8)
    sigma = call["timestep"].reshape(1, 1, 1)
    assert 0 < float(sigma) <= 1  # the transformer is told σ = t / 1000
    noise = (call["hidden_states"] - (1 - sigma) * x0) / sigma
    embeds, pooled, text_ids = pipe.encode_prompt(CAPTION, CAPTION, max_sequence_length=32)
    assert torch.allclose(call["encoder_hidden_states"], embeds, atol=1e-6)
    assert torch.allclose(call["pooled_projections"], pooled, atol=1e-6)
    assert torch.equal(call["guidance"], torch.tensor([3.5]))
    assert torch.equal(call["img_ids"], FluxPipeline._prepare_latent_image_ids(1, 4, 4, "cpu",
                                                                               torch.float32))
    with torch.no_grad():
        pred = pipe.transformer(hidden_states=call["hidden_states"], timestep=call["timestep"],
                                guidance=torch.tensor([3.5]), pooled_projections=pooled,
                                encoder_hidden_states=embeds, txt_ids=text_ids,
                                img_ids=call["img_ids"], return_dict=False)[0]
    expected = F.mse_loss(pred, noise - x0).item()
    assert logged == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert 0.5 < float(noise.std()) < 1.5  # a sane Gaussian: x₀'s shift and scale agree
