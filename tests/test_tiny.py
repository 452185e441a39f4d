"""The tiny offline models behind tests and the demo load and run in the real libraries."""

from __future__ import annotations

import pytest

from loracli import tiny


def test_clip_tokenizer_matches_the_real_one(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny.write_clip_tokenizer(tmp_path / "tok"))
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408 and tok.model_max_length == 77


@pytest.mark.slow
def test_tiny_sd_runs_two_inference_steps(tiny_sd):
    import numpy as np
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, local_files_only=True)
    images = pipe("a red square", num_inference_steps=2, height=64, width=64,
                  output_type="np").images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


@pytest.mark.slow
def test_tiny_sdxl_and_sd2_load(tiny_sdxl, tiny_sd2):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    xl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    assert xl.text_encoder_2 is not None and xl.unet.config.addition_embed_type == "text_time"
    images = xl("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
    v = StableDiffusionPipeline.from_pretrained(tiny_sd2, local_files_only=True)
    assert v.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.slow
def test_builds_are_deterministic(tmp_path, tiny_sd):
    again = tiny.build_tiny_sd(tmp_path / "again", "sd1")
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (again / rel).read_bytes() == (tiny_sd / rel).read_bytes()


@pytest.mark.slow
def test_tiny_open_clip_loads_as_local_dir(tiny_open_clip):
    import open_clip
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_open_clip}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{tiny_open_clip}")
    with torch.no_grad():
        text = model.encode_text(tokenizer(["a red square"]), normalize=True)
    assert text.shape == (1, tiny.OPEN_CLIP_TINY["embed_dim"])


@pytest.mark.slow
def test_tiny_sd_in_the_cache_carries_the_packaged_unet_and_draws_shapes(tiny_sd):
    from pathlib import Path

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from safetensors.torch import load_file

    from loracli.hub import models

    snapshot = models.install_tiny()
    packaged = load_file(str(Path(tiny.__file__).parent / tiny.UNET_WEIGHTS))
    unet = UNet2DConditionModel.from_pretrained(snapshot / "unet")
    assert all(torch.equal(v, packaged[k].float()) for k, v in unet.state_dict().items())

    def roughness(folder) -> float:
        """Mean jump between neighbouring 8x8 blocks: noise is rough, shapes are not."""
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        image = pipe("a red square on a white background", num_inference_steps=20,
                     height=64, width=64, generator=torch.Generator().manual_seed(0),
                     output_type="np").images[0][::8, ::8]
        return float(np.abs(np.diff(image, axis=0)).mean() + np.abs(np.diff(image, axis=1)).mean())

    assert roughness(snapshot) < 0.5 * roughness(tiny_sd)
