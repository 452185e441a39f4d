"""`lora export` on a tiny SDXL-shaped run: kohya's SDXL layout (`lora_te1_`/`lora_te2_`, LDM UNet
names) loaded by diffusers' SDXL pipeline applies exactly the trained effect."""

from __future__ import annotations

import pytest
from export_fixtures import (FP16_RELATIVE_BOUND, encoders, load_component, make_run, outputs,
                             pipeline_outputs, reference_models)

from loracli.exporting import export as exporting

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory, tiny_sdxl):
    run = make_run(tmp_path_factory.mktemp("sdxl") / "anime", tiny_sdxl, "sdxl", rank=4, alpha=2.0)
    untrained = {c: load_component(tiny_sdxl, c).eval() for c in ("unet", *encoders("sdxl"))}
    return {"run": run, "base": tiny_sdxl, "trained": outputs(reference_models(run), "sdxl"),
            "untrained": outputs(untrained, "sdxl")}


def _load(base, path):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    pipe.load_lora_weights(str(path))
    return pipeline_outputs(pipe, "sdxl")


def test_sdxl_kohya_names_use_te1_te2_and_the_ldm_unet_layout(sdxl, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    result = exporting.export(sdxl["run"], dtype="fp32", output=tmp_path / "xl.safetensors")
    assert result.modules == {"unet": 136, "text_encoder": 8, "text_encoder_2": 8}
    keys = load_file(str(result.path))
    stems = {k.split(".")[0] for k in keys}
    assert {s for s in stems if s.startswith("lora_te1_")} == {
        f"lora_te1_text_model_encoder_layers_{i}_self_attn_{p}" for i in (0, 1)
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert len([s for s in stems if s.startswith("lora_te2_text_model_encoder_layers_")]) == 8
    unet = [s for s in stems if s.startswith("lora_unet_")]
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in unet
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0" in unet
    assert "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_v" in unet
    assert not [s for s in unet if any(d in s for d in ("down_blocks", "up_blocks", "mid_block"))]
    with safe_open(str(result.path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == (
        "sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora")


def test_sdxl_pipeline_loads_the_kohya_file_with_the_trained_effect(sdxl, tmp_path):
    result = exporting.export(sdxl["run"], dtype="fp32", output=tmp_path / "xl32.safetensors")
    got = _load(sdxl["base"], result.path)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        effect = (sdxl["trained"][component] - sdxl["untrained"][component]).abs().max().item()
        assert effect > 0.05, component
        assert (got[component] - sdxl["trained"][component]).abs().max().item() <= 1e-6, component


def test_sdxl_fp16_stays_within_the_bound(sdxl, tmp_path):
    result = exporting.export(sdxl["run"], output=tmp_path / "xl16.safetensors")
    got = _load(sdxl["base"], result.path)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        effect = (sdxl["trained"][component] - sdxl["untrained"][component]).abs().max().item()
        diff = (got[component] - sdxl["trained"][component]).abs().max().item()
        assert 0 < diff <= FP16_RELATIVE_BOUND * effect, (component, diff, effect)
