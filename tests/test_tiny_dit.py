"""The tiny FLUX.1 and SD3.5 pipelines: real diffusers folders, deterministic, and they draw."""

from __future__ import annotations

import hashlib
import json

import pytest

from loracli import tiny_dit

pytestmark = pytest.mark.slow


def _digest(folder):
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("kind", ["flux-dev", "sd3"])
def test_tiny_pipeline_loads_and_draws_two_steps(tmp_path, kind):
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    folder = tiny_dit.build_tiny_dit(tmp_path / kind, kind)
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert vae["latent_channels"] == 16
    assert (vae["scaling_factor"], vae["shift_factor"]) == tiny_dit.VAE_FACTORS[kind[:4]]
    assert not (folder / ".tokenizer-build").exists()
    cls = FluxPipeline if kind.startswith("flux") else StableDiffusion3Pipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if kind == "flux-dev":
        assert pipe.transformer.config.guidance_embeds
    else:
        assert pipe.text_encoder_3 is not None
    t5 = pipe.tokenizer_2 if kind.startswith("flux") else pipe.tokenizer_3
    ids = t5("a red disc").input_ids
    assert ids[-1] == t5.eos_token_id == 1 and t5.pad_token_id == 0 and t5.unk_token_id not in ids
    images = [pipe("a red disc", num_inference_steps=2, height=64, width=64,
                   max_sequence_length=32, output_type="np",
                   generator=torch.Generator().manual_seed(seed)).images for seed in (0, 0, 1)]
    assert images[0].shape == (1, 64, 64, 3)
    assert (images[0] == images[1]).all() and not (images[0] == images[2]).all()


def test_tiny_flux_is_deterministic_and_schnell_has_no_guidance(tmp_path):
    a = tiny_dit.build_tiny_dit(tmp_path / "a", "flux-schnell")
    b = tiny_dit.build_tiny_dit(tmp_path / "b", "flux-schnell")
    assert _digest(a) == _digest(b)
    config = json.loads((a / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False
    scheduler = json.loads((a / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["shift"] == 1.0 and not scheduler["use_dynamic_shifting"]
