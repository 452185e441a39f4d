"""Key conversion tables and alpha arithmetic, tested with literals (no models loaded)."""

from __future__ import annotations

import json
import math

import pytest

from loracli.exporting import convert, inspection

SDXL_UNET = {"layers_per_block": 2,
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


@pytest.mark.parametrize("path, ldm", [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    ("down_blocks.1.attentions.1.proj_in", "input_blocks.5.1.proj_in"),
    ("down_blocks.2.attentions.0.transformer_blocks.1.attn2.to_out.0", "input_blocks.7.1.transformer_blocks.1.attn2.to_out.0"),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.resnets.0.time_emb_proj", "input_blocks.1.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "middle_block.1.transformer_blocks.0.ff.net.2"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_k", "output_blocks.2.1.transformer_blocks.0.attn1.to_k"),
    ("up_blocks.1.attentions.0.proj_out", "output_blocks.3.1.proj_out"),
    ("up_blocks.0.upsamplers.0.conv", "output_blocks.2.2.conv"),
    ("up_blocks.2.resnets.2.norm2", "output_blocks.8.0.out_layers.0"),
    ("conv_in", "input_blocks.0.0"),
    ("add_embedding.linear_2", "label_emb.0.2"),
    ("time_embedding.linear_1", "time_embed.0"),
])
def test_sdxl_unet_names_follow_the_ldm_layout(path, ldm):
    assert convert.unet_to_ldm(path, SDXL_UNET) == ldm


def test_unknown_unet_module_has_no_ldm_name():
    with pytest.raises(convert.ConversionError, match="no LDM equivalent"):
        convert.unet_to_ldm("down_blocks.0.resnets.0.mystery", SDXL_UNET)


@pytest.mark.parametrize("component, path, family, stem", [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "sd1",
     "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"),
    ("unet", "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_out.0", "sd2",
     "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0"),
    # transformers 5 CLIPTextModel paths start at `encoder.`: `text_model_` must be inserted.
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "sd1",
     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ("text_encoder", "encoder.layers.11.mlp.fc1", "sdxl",
     "lora_te1_text_model_encoder_layers_11_mlp_fc1"),
    # CLIPTextModelWithProjection keeps its `text_model.`: not doubled.
    ("text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj", "sdxl",
     "lora_te2_text_model_encoder_layers_0_self_attn_out_proj"),
    ("text_encoder_2", "text_projection", "sdxl", "lora_te2_text_projection"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "sdxl",
     "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
])
def test_kohya_stems(component, path, family, stem):
    assert convert.kohya_stem(component, path, family, SDXL_UNET) == stem


def test_sd1_has_no_second_text_encoder_prefix():
    with pytest.raises(convert.ConversionError):
        convert.kohya_stem("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", "sd1")


@pytest.mark.parametrize("config, rank, alpha", [
    ({"r": 8, "lora_alpha": 16}, 8, 16.0),                        # alpha ≠ rank kept as is
    ({"r": 4, "lora_alpha": 4}, 4, 4.0),
    ({"r": 8, "lora_alpha": 4, "use_rslora": True}, 8, 4 * math.sqrt(8)),   # scaling 4/√8 = α_k/8
    ({"r": 16, "lora_alpha": 8, "alpha_pattern": {"to_q": 2}}, 16, 2.0),
])
def test_peft_alpha_reproduces_peft_scaling(config, rank, alpha):
    got = convert.peft_alpha(config, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", rank)
    assert got == pytest.approx(alpha, rel=1e-12)


def _sd(rank=2, out=6, inp=5, extra=None):
    import torch

    sd = {"a.to_q.lora_A.weight": torch.ones(rank, inp), "a.to_q.lora_B.weight": torch.ones(out, rank)}
    sd.update(extra or {})
    return sd


def test_to_kohya_is_a_pure_rename_with_fp32_alpha():
    import torch

    modules = convert.from_peft("unet", _sd(), {"r": 2, "lora_alpha": 3, "use_rslora": True})
    out = convert.to_kohya(modules, "sd1", dtype=torch.float16)
    assert sorted(out) == ["lora_unet_a_to_q.alpha", "lora_unet_a_to_q.lora_down.weight",
                           "lora_unet_a_to_q.lora_up.weight"]
    assert out["lora_unet_a_to_q.lora_down.weight"].shape == (2, 5)
    assert out["lora_unet_a_to_q.lora_up.weight"].dtype == torch.float16
    assert out["lora_unet_a_to_q.alpha"].dtype == torch.float32
    assert out["lora_unet_a_to_q.alpha"].item() == pytest.approx(3 * math.sqrt(2), rel=1e-7)


def test_dora_and_extra_tensors_are_refused():
    import torch

    with pytest.raises(convert.ConversionError, match="DoRA"):
        convert.from_peft("unet", _sd(), {"r": 2, "lora_alpha": 2, "use_dora": True})
    with pytest.raises(convert.ConversionError, match="not a plain LoRA tensor"):
        convert.from_peft("unet", _sd(extra={"a.to_q.lora_B.bias": torch.ones(6)}), {"r": 2})


def test_peft_to_diffusers_prefixes_tensors_and_packs_the_adapter_config():
    import json

    import torch

    sd = _sd(extra={"a.to_q.lora_magnitude_vector": torch.ones(6)})
    tensors, header = convert.peft_to_diffusers(
        {"text_encoder": (sd, {"r": 2, "lora_alpha": 4, "use_dora": True, "target_modules": {"q"}})})
    assert sorted(tensors) == ["text_encoder.a.to_q.lora_A.weight", "text_encoder.a.to_q.lora_B.weight",
                               "text_encoder.a.to_q.lora_magnitude_vector"]
    assert json.loads(header["lora_adapter_metadata"]) == {
        "text_encoder.r": 2, "text_encoder.lora_alpha": 4, "text_encoder.use_dora": True,
        "text_encoder.target_modules": ["q"]}


@pytest.mark.parametrize("keys, fmt", [
    (["lora_unet_x.lora_down.weight", "lora_te_y.alpha"], "kohya"),
    (["unet.x.lora_A.weight", "text_encoder.y.lora_B.weight"], "diffusers"),
    (["base_model.model.x.lora_A.weight"], "peft"),
    (["down_blocks.0.x.lora_A.weight"], "peft"),
    (["model.diffusion_model.x.weight"], "unknown"),
])
def test_detect_format(keys, fmt):
    assert inspection.detect_format(keys) == fmt


def test_kohya_keys_are_checked_against_the_base_modules():
    from loracli.errors import LoraError
    from loracli.exporting import basecheck

    found = {"unet": {"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (32, 32)},
             "text_encoder": {"encoder.layers.0.self_attn.q_proj": (32, 32)}}
    good = ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"]
    basecheck.check_kohya_keys(dict.fromkeys(good), found, "sd1", {})
    # Trap 1: without `text_model_` A1111 and ComfyUI drop the text-encoder LoRA silently.
    bad = good + ["lora_te_encoder_layers_0_self_attn_q_proj.lora_down.weight"]
    with pytest.raises(LoraError, match="nothing was written") as e:
        basecheck.check_kohya_keys(dict.fromkeys(bad), found, "sd1", {})
    assert e.value.details == ["lora_te_encoder_layers_0_self_attn_q_proj: names no module of the base model"]


@pytest.mark.parametrize("output, fmt, want", [
    (None, "kohya", "run/anime.safetensors"),
    (None, "diffusers", "run/anime-diffusers/pytorch_lora_weights.safetensors"),
    (None, "peft", "run/anime-peft"),
    (None, "merged", "run/anime-merged"),
    ("x/my.safetensors", "kohya", "x/my.safetensors"),
    ("x/", "kohya", "x/anime.safetensors"),
    ("x/d", "diffusers", "x/d/pytorch_lora_weights.safetensors"),
    ("x/d.safetensors", "diffusers", "x/d.safetensors"),
    ("x/p", "peft", "x/p"),
])
def test_output_paths(output, fmt, want, tmp_path, monkeypatch):
    from pathlib import Path

    from loracli.exporting import export

    monkeypatch.chdir(tmp_path)
    assert export.output_path(output, Path("run"), "anime", fmt) == Path(want)


def test_a_kohya_file_must_end_in_safetensors(tmp_path):
    from pathlib import Path

    from loracli.errors import LoraError
    from loracli.exporting import export

    with pytest.raises(LoraError, match="must end in .safetensors") as e:
        export.output_path(tmp_path / "anime.ckpt", Path("run"), "anime", "kohya")
    assert e.value.hint == f"-o {tmp_path / 'anime.safetensors'}"


def test_sshs_hashes_follow_sd_scripts_on_a_file_over_one_mib():
    """sshs_legacy_hash: sha256 of the 64 KiB at 1 MiB of the file saved with its ss_* keys only,
    8 hex digits (sd-scripts precalculate_safetensors_hashes / addnet_hash_legacy); it does not
    change when other header keys do. sshs_model_hash: sha256 of everything after the header."""
    import hashlib
    import io

    import torch
    from safetensors.torch import save

    from loracli.exporting.metadata import serialize

    tensors = {"lora_unet_x.lora_down.weight": torch.arange(600_000, dtype=torch.float32).reshape(1000, 600)}
    header = {"ss_output_name": "x", "ss_network_dim": "4", "modelspec.title": "x"}
    data = serialize(tensors, header)
    b = io.BytesIO(save(tensors, {"ss_output_name": "x", "ss_network_dim": "4"}))
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[:8]
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + n])["__metadata__"]
    assert len(data) > 0x110000
    assert meta["sshs_legacy_hash"] == legacy != hashlib.sha256(b"").hexdigest()[:8]
    assert meta["sshs_model_hash"] == hashlib.sha256(data[8 + n:]).hexdigest()
    other = serialize(tensors, {**header, "modelspec.title": "renamed"})
    m = int.from_bytes(other[:8], "little")
    assert json.loads(other[8:8 + m])["__metadata__"]["sshs_legacy_hash"] == legacy
