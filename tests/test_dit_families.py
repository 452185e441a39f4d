"""FLUX.1 and SD3.5 behind the family seam: detection, geometry, conditioning, objective, versions.

Oracles are diffusers' own: the pipelines' `encode_prompt`, FluxPipeline's packing helpers, the
scheduler's sigma table, and `compute_density_for_timestep_sampling`.
"""

from __future__ import annotations

import json

import pytest
from dit_fixtures import tiny_dit_folder

from loracli import families, tiny_dit
from loracli.errors import LoraError
from loracli.families import loading

BFL_KEYS = ["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight", "img_in.weight"]
SD35_KEYS = ["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight",
             "model.diffusion_model.joint_blocks.0.context_block.attn.ln_k.weight"]


def test_single_files_are_recognised_by_their_tensor_names():
    assert families.detect_checkpoint(BFL_KEYS + ["guidance_in.in_layer.weight"], "f") == "flux-dev"
    assert families.detect_checkpoint(BFL_KEYS, "f") == "flux-schnell"
    assert families.detect_checkpoint(["model.diffusion_model." + k for k in BFL_KEYS], "f") \
        == "flux-schnell"
    assert families.detect_checkpoint(SD35_KEYS, "f") == "sd35-large"
    assert families.detect_checkpoint(
        SD35_KEYS + ["model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"], "f") \
        == "sd35-medium"
    assert families.detect_checkpoint(["model.diffusion_model.input_blocks.0.0.weight"], "f") == "sd1"


def test_versions_targets_and_layouts_as_the_ecosystem_writes_them():
    dev, schnell = families.get("flux-dev"), families.get("flux-schnell")
    medium, large = families.get("sd35-medium"), families.get("sd35-large")
    assert (dev.base_version, schnell.base_version) == ("flux1", "flux1")
    assert dev.modelspec("flow_matching") == ("flux-1-dev", "https://github.com/black-forest-labs/flux")
    assert schnell.modelspec("flow_matching")[0] == "flux-1-schnell"
    assert (medium.base_version, large.base_version) == ("5-medium", "5-large")
    assert large.modelspec("flow_matching") == ("stable-diffusion-3-5-large", "diffusers")
    assert dev.kohya_prefixes == {"transformer": "lora_unet", "text_encoder": "lora_te1"}
    assert medium.kohya_prefixes["text_encoder_2"] == "lora_te2"
    assert dev.trainable == ("transformer", "text_encoder")  # T5 never gets a LoRA
    assert (dev.pipeline, medium.pipeline) == ("FluxPipeline", "StableDiffusion3Pipeline")
    for fam in (dev, medium):
        assert {"attn.to_q", "attn.add_q_proj", "ff.net.0.proj", "ff_context.net.2"} <= \
            set(fam.unet_targets)
    with pytest.raises(LoraError, match="flow matching"):
        dev.objective("epsilon")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {kind: tiny_dit_folder(tmp_path_factory, kind) for kind in ("flux-dev", "sd3")}


@pytest.mark.slow
def test_tiny_models_resolve_to_their_family_with_vae_geometry(built, tmp_path):
    flux = loading.resolve_base(str(built["flux-dev"]))
    sd3 = loading.resolve_base(str(built["sd3"]))
    assert (flux.family, flux.prediction_type) == ("flux-dev", "flow_matching")
    assert (sd3.family, sd3.prediction_type) == ("sd35-medium", "flow_matching")
    fam = families.get("flux-dev")
    config = json.loads((built["flux-dev"] / "vae" / "config.json").read_text())
    geometry = fam.geometry(config, {"in_channels": 64})
    assert (geometry.latent_channels, geometry.downsample) == (16, 8)
    assert (geometry.scaling, geometry.shift) == (0.3611, 0.1159)
    assert geometry.pixel_multiple == 16  # 8x VAE, then 2x2 packing
    assert geometry.latent_shape(64, 96) == (16, 8, 12)
    with pytest.raises(LoraError, match="16-channel latents but the flux-dev transformer takes 16"):
        fam.geometry(config, {"in_channels": 16})


@pytest.mark.slow
@pytest.mark.parametrize("kind,family", [("flux-dev", "flux-dev"), ("sd3", "sd35-medium")])
def test_conditioning_is_what_the_pipeline_encodes(built, kind, family):
    import torch
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    fam = families.get(family)
    flux = kind.startswith("flux")
    pipe = (FluxPipeline if flux else StableDiffusion3Pipeline).from_pretrained(
        built[kind], local_files_only=True)
    captions = ["a red disc", "a blue square on a white background"]
    encoders = [getattr(pipe, n) for n in fam.text_encoders]
    tokenizers = [getattr(pipe, n) for n in fam.tokenizers]
    with torch.no_grad():
        text = fam.encode(encoders, tokenizers, captions, torch.device("cpu"))
        if flux:
            embeds, pooled, _ = pipe.encode_prompt(captions, captions, max_sequence_length=32)
        else:
            embeds, _, pooled, _ = pipe.encode_prompt(captions, captions, captions,
                                                      do_classifier_free_guidance=False,
                                                      max_sequence_length=32)
    cond = fam.conditioning(text, {})
    assert torch.equal(cond["encoder_hidden_states"], embeds)
    assert torch.equal(cond["pooled_projections"], pooled)


@pytest.mark.slow
def test_flux_forward_packs_like_the_training_script(built):
    """family.forward = diffusers' train_dreambooth_lora_flux.py step, written out with
    FluxPipeline's own packing helpers."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel

    fam = families.get("flux-dev")
    transformer = FluxTransformer2DModel.from_pretrained(built["flux-dev"], subfolder="transformer")
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 16, 8, 12, generator=g)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 32, generator=g)}
    timesteps = torch.tensor([250.0, 900.0])
    with torch.no_grad():
        got = fam.forward(transformer, noisy, timesteps, cond)
        packed = FluxPipeline._pack_latents(noisy, 2, 16, 8, 12)
        ids = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
        out = transformer(hidden_states=packed, timestep=timesteps / 1000,
                          guidance=torch.tensor([3.5, 3.5]), pooled_projections=cond["pooled_projections"],
                          encoder_hidden_states=cond["encoder_hidden_states"],
                          txt_ids=torch.zeros(5, 3), img_ids=ids, return_dict=False)[0]
        want = FluxPipeline._unpack_latents(out, 64, 96, 8)
    assert got.shape == noisy.shape
    assert torch.equal(got, want)


def _scheduler(kind):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**tiny_dit.SCHEDULERS[kind])


def test_flow_matching_noises_toward_the_velocity_target():
    import torch

    objective = families.get("flux-dev").objective("flow_matching")
    scheduler = objective.scheduler(_scheduler("flux-dev").config)
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    t = torch.tensor([0, 500, 999])
    noisy, target = objective.noisy_input_and_target(latents, noise, t, scheduler)
    sigma = torch.tensor([1.0, 0.5, 0.001]).view(-1, 1, 1, 1)  # uniform: step t, unshifted
    assert torch.allclose(noisy, (1 - sigma) * latents + sigma * noise, atol=1e-6)
    assert torch.equal(target, noise - latents)
    assert torch.allclose(objective.model_timesteps(t, scheduler), sigma.flatten() * 1000)
    assert objective.weights(t, scheduler, 5.0) is None


def test_sd3_draws_logit_normal_sigmas_on_its_shifted_schedule():
    import torch
    from diffusers.training_utils import compute_density_for_timestep_sampling

    objective = families.get("sd35-large").objective("flow_matching")
    scheduler = objective.scheduler(_scheduler("sd3").config)
    every = torch.arange(1000)  # the trainer draws t uniformly from these
    sigmas = objective.sigmas(every, scheduler)
    # the scheduler's shift 3.0: σ = 3s / (1 + 2s) of the unshifted s = 1 - index / 1000
    index = objective.indices(every, scheduler)
    s = 1 - index.double() / 1000
    assert torch.allclose(sigmas.double(), 3 * s / (1 + 2 * s), atol=1e-6)
    # u = index / T follows diffusers' logit-normal density (the sd3 script's default)
    torch.manual_seed(0)
    reference = compute_density_for_timestep_sampling("logit_normal", 200_000, 0.0, 1.0)
    ours = index.double() / 1000
    for q in (0.05, 0.25, 0.5, 0.75, 0.95):
        assert abs(torch.quantile(ours, q) - torch.quantile(reference.double(), q)) < 0.01
    assert abs(ours.mean() - 0.5) < 0.01 and (ours.std() - reference.std()).abs() < 0.01
    # while FLUX's uniform density maps step t to index t
    flux = families.get("flux-schnell").objective("flow_matching")
    assert torch.equal(flux.indices(every, scheduler), every)


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_dit_presets_list_and_comment_every_key(name):
    import tomllib

    from loracli import profiles

    text = profiles.preset_text(name)
    data = tomllib.loads(text)
    profiles.parse(data, name)
    assert {f"{s}.{k}" for s, table in data.items() for k in table} == set(profiles.all_keys())
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line.split("=", 1)[1], f"{name}: no comment on {line!r}"


def test_presets_train_the_family_defaults():
    from loracli import profiles

    flux, sd35 = profiles.load("flux"), profiles.load("sd35")
    assert (flux.model.base, sd35.model.base) == ("flux-dev", "sd35-large")
    assert tuple(flux.lora.targets) == families.get("flux-dev").unet_targets
    assert tuple(sd35.lora.targets) == families.get("sd35-large").unet_targets
    assert flux.train.mixed_precision == "bf16" and flux.train.cache_text


def test_loader_report_for_flux_and_sd3_kohya_files():
    from loracli.exporting import compat

    flux = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te1_text_model_encoder_layers_0_self_attn_out_proj"]
    rows = {r["loader"]: r for r in compat.report(flux, "flux-dev")}
    assert rows["comfyui"]["applied"] == rows["sd-scripts"]["applied"] == 4
    assert rows["a1111"]["ignored"] == flux[:2]  # no FLUX model in AUTOMATIC1111
    sd3 = ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_0_context_block_mlp_fc1"]
    rows = {r["loader"]: r for r in compat.report(sd3, "sd35-large")}
    assert rows["comfyui"]["applied"] == rows["sd-scripts"]["applied"] == 2
    assert rows["diffusers"]["applied"] == 0  # diffusers has no kohya converter for SD3
