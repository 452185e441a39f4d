"""FLUX/SD3 LoRA files: the diffusers layout loads in diffusers with the trained effect; the kohya
layout, merged as ComfyUI merges it, gives the trained weights.

The LoRA here is peft's, injected into the tiny transformer with random `lora_B` (what a trained
adapter looks like to a converter). The reference merge below follows ComfyUI's rules, written
out in the test: `lora_unet_{native key with _}` patches the native weight, `alpha / rank` scales
`up @ down`, and the native weight of a fused module is diffusers' parts stacked in order
(comfy/utils.py `flux_to_diffusers` / `mmdit_to_diffusers`).
"""

from __future__ import annotations

import pytest
from dit_fixtures import tiny_dit_folder

from loracli import families
from loracli.exporting import convert, convert_dit

pytestmark = pytest.mark.slow

# ComfyUI's own map, restated: native module → diffusers modules whose weights it stacks
FLUX_COMFY = {"double_blocks.{i}.img_attn.qkv": ["transformer_blocks.{i}.attn.to_q",
                                                 "transformer_blocks.{i}.attn.to_k",
                                                 "transformer_blocks.{i}.attn.to_v"],
              "double_blocks.{i}.txt_attn.qkv": ["transformer_blocks.{i}.attn.add_q_proj",
                                                 "transformer_blocks.{i}.attn.add_k_proj",
                                                 "transformer_blocks.{i}.attn.add_v_proj"],
              "double_blocks.{i}.img_attn.proj": ["transformer_blocks.{i}.attn.to_out.0"],
              "double_blocks.{i}.txt_attn.proj": ["transformer_blocks.{i}.attn.to_add_out"],
              "double_blocks.{i}.img_mlp.0": ["transformer_blocks.{i}.ff.net.0.proj"],
              "double_blocks.{i}.img_mlp.2": ["transformer_blocks.{i}.ff.net.2"],
              "double_blocks.{i}.txt_mlp.0": ["transformer_blocks.{i}.ff_context.net.0.proj"],
              "double_blocks.{i}.txt_mlp.2": ["transformer_blocks.{i}.ff_context.net.2"],
              "single_blocks.{i}.linear1": ["single_transformer_blocks.{i}.attn.to_q",
                                            "single_transformer_blocks.{i}.attn.to_k",
                                            "single_transformer_blocks.{i}.attn.to_v",
                                            "single_transformer_blocks.{i}.proj_mlp"],
              "single_blocks.{i}.linear2": ["single_transformer_blocks.{i}.proj_out"]}
SD3_COMFY = {"joint_blocks.{i}.x_block.attn.qkv": ["transformer_blocks.{i}.attn.to_q",
                                                   "transformer_blocks.{i}.attn.to_k",
                                                   "transformer_blocks.{i}.attn.to_v"],
             "joint_blocks.{i}.context_block.attn.qkv": ["transformer_blocks.{i}.attn.add_q_proj",
                                                         "transformer_blocks.{i}.attn.add_k_proj",
                                                         "transformer_blocks.{i}.attn.add_v_proj"],
             "joint_blocks.{i}.x_block.attn.proj": ["transformer_blocks.{i}.attn.to_out.0"],
             "joint_blocks.{i}.context_block.attn.proj": ["transformer_blocks.{i}.attn.to_add_out"],
             "joint_blocks.{i}.x_block.attn2.qkv": ["transformer_blocks.{i}.attn2.to_q",
                                                    "transformer_blocks.{i}.attn2.to_k",
                                                    "transformer_blocks.{i}.attn2.to_v"],
             "joint_blocks.{i}.x_block.attn2.proj": ["transformer_blocks.{i}.attn2.to_out.0"],
             "joint_blocks.{i}.x_block.mlp.fc1": ["transformer_blocks.{i}.ff.net.0.proj"],
             "joint_blocks.{i}.x_block.mlp.fc2": ["transformer_blocks.{i}.ff.net.2"],
             "joint_blocks.{i}.context_block.mlp.fc1": ["transformer_blocks.{i}.ff_context.net.0.proj"],
             "joint_blocks.{i}.context_block.mlp.fc2": ["transformer_blocks.{i}.ff_context.net.2"]}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return {kind: tiny_dit_folder(tmp_path_factory, kind) for kind in ("flux-dev", "sd3")}


def _pipeline(folder):
    import json

    import diffusers

    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inject(module, targets, seed, **extra):
    """A peft LoRA with random lora_B, as training leaves it; returns its (state dict, config)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), **extra)
    torch.manual_seed(seed)
    inject_adapter_in_model(config, module, adapter_name="default")
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    module.eval()
    return get_peft_model_state_dict(module, adapter_name="default"), config.to_dict()


def _transformer_inputs(pipe, flux: bool):
    import torch

    g = torch.Generator().manual_seed(7)
    if flux:
        return dict(hidden_states=torch.randn(1, 16, 64, generator=g), timestep=torch.tensor([0.6]),
                    guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32, generator=g),
                    encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                    txt_ids=torch.zeros(8, 3), img_ids=torch.rand(16, 3, generator=g) * 4,
                    return_dict=False)
    return dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), timestep=torch.tensor([600.0]),
                pooled_projections=torch.randn(1, 64, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 64, generator=g), return_dict=False)


@pytest.mark.parametrize("kind,family", [("flux-dev", "flux-dev"), ("sd3", "sd35-medium")])
def test_diffusers_layout_loads_with_the_trained_effect(built, tmp_path, kind, family):
    import torch
    from safetensors.torch import save_file

    fam = families.get(family)
    flux = kind.startswith("flux")
    trained = _pipeline(built[kind])
    adapters = {"transformer": _inject(trained.transformer, fam.unet_targets, 1),
                "text_encoder": _inject(trained.text_encoder, fam.text_targets, 2)}
    tensors, header = convert.peft_to_diffusers(adapters)
    assert all(k.startswith(("transformer.", "text_encoder.")) for k in tensors)
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path), metadata=header)

    loaded = _pipeline(built[kind])
    inputs = _transformer_inputs(loaded, flux)
    with torch.no_grad():
        base = loaded.transformer(**inputs)[0]
        loaded.load_lora_weights(str(path))
        want, got = trained.transformer(**inputs)[0], loaded.transformer(**inputs)[0]
        ids = trained.tokenizer(["a red disc"], return_tensors="pt").input_ids
        want_text, got_text = trained.text_encoder(ids)[0], loaded.text_encoder(ids)[0]
    assert (want - base).abs().max() > 1e-2  # the LoRA changes the output
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(got_text, want_text, atol=1e-5)


def _native_base(transformer, comfy_map, blocks):
    """The transformer's weights in the original layout, stacked as ComfyUI's map says."""
    import torch

    state = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    native = {}
    for name, parts in comfy_map.items():
        for i in range(blocks[name.split(".")[0]]):
            keys = [p.format(i=i) + ".weight" for p in parts]
            keys = [k.replace(".weight", ".base_layer.weight") if k.replace(
                ".weight", ".base_layer.weight") in state else k for k in keys]
            if all(k in state for k in keys):
                native[name.format(i=i) + ".weight"] = torch.cat([state[k] for k in keys])
    return native


def _comfy_merge(native: dict, kohya: dict) -> dict:
    """ComfyUI's rule: `lora_unet_{k}` → native weight k; W += alpha / rank · up @ down."""
    merged = dict(native)
    lookup = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in native}
    stems = {k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}
    for stem in stems:
        assert stem in lookup, f"{stem}: ComfyUI would ignore this key"
        down, up = kohya[f"{stem}.lora_down.weight"].float(), kohya[f"{stem}.lora_up.weight"].float()
        alpha = kohya[f"{stem}.alpha"].item()
        merged[lookup[stem]] = merged[lookup[stem]] + alpha / down.shape[0] * (up @ down)
    return merged


@pytest.mark.parametrize("kind,family,layout,comfy_map,extra", [
    ("flux-dev", "flux-dev", "flux", FLUX_COMFY, {}),
    ("flux-dev", "flux-dev", "flux", FLUX_COMFY, {"rank_pattern": {"attn.to_k": 2}}),
    ("sd3", "sd35-medium", "mmdit", SD3_COMFY, {}),
])
def test_kohya_layout_merged_as_comfyui_gives_the_trained_weights(built, kind, family, layout,
                                                                   comfy_map, extra):
    import torch

    fam = families.get(family)
    pipe = _pipeline(built[kind])
    transformer = pipe.transformer
    sd, config = _inject(transformer, fam.unet_targets, 3, **extra)
    te_sd, te_config = _inject(pipe.text_encoder, fam.text_targets, 4)
    modules = convert.from_peft("transformer", sd, config) + \
        convert.from_peft("text_encoder", te_sd, te_config)
    native = convert_dit.to_native(modules, layout, dict(transformer.config))
    kohya = convert.to_kohya(native, fam)
    stems = {k.split(".")[0] for k in kohya}
    assert all(s.startswith(("lora_unet_", "lora_te1_text_model_encoder_layers_")) for s in stems)
    fused = "lora_unet_double_blocks_0_img_attn_qkv" if layout == "flux" else \
        "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert kohya[f"{fused}.lora_down.weight"].shape[0] == (8 + 2 if extra else 12)
    assert f"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in kohya

    blocks = {"double_blocks": len(transformer.transformer_blocks),
              "single_blocks": len(getattr(transformer, "single_transformer_blocks", [])),
              "joint_blocks": len(transformer.transformer_blocks)}
    merged = _comfy_merge(_native_base(transformer, comfy_map, blocks), kohya)
    lora_layers = {name: m for name, m in transformer.named_modules() if hasattr(m, "lora_A")}
    checked = 0
    for name, parts in comfy_map.items():
        for i in range(blocks[name.split(".")[0]]):
            key = name.format(i=i) + ".weight"
            if key not in merged:
                continue
            row = 0
            for part in (p.format(i=i) for p in parts):
                layer = lora_layers.get(part) or transformer.get_submodule(part)
                weight = layer.base_layer.weight if part in lora_layers else layer.weight
                want = weight.detach() + (layer.get_delta_weight("default").detach()
                                          if part in lora_layers else 0)
                got = merged[key][row:row + want.shape[0]]
                assert torch.allclose(got, want, atol=1e-5), (part, (got - want).abs().max())
                row += want.shape[0]
                checked += part in lora_layers
    assert checked == len(lora_layers)  # every trained module was reached through a kohya key


def test_a_module_with_swapped_scale_and_shift_is_refused():
    import torch

    m = convert.LoraModule("transformer", "norm_out.linear", torch.zeros(2, 4), torch.zeros(8, 2), 2)
    with pytest.raises(convert.ConversionError, match="scale and shift"):
        convert_dit.to_native([m], "flux", {})
    m = convert.LoraModule("transformer", "pos_embed.proj", torch.zeros(2, 4), torch.zeros(8, 2), 2)
    with pytest.raises(convert.ConversionError, match="no equivalent"):
        convert_dit.to_native([m], "flux", {})
