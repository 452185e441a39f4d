"""Every kohya key `lora export` writes, on the real SD1.5, SD2.1 and SDXL module layouts (meta
device: no weights), lands on the module it was trained on under each loader's own rules; and the
per-loader report (`loracli.exporting.compat`) says exactly what those rules apply.

Oracles (tests/export_layouts.py): diffusers' own conversion code, sd-scripts' module-building rule
run on the real model classes, and A1111's and ComfyUI's key maps transcribed from their code.
"""

from __future__ import annotations

import pytest
from export_layouts import (LAYOUTS, TEXT_ATTENTION, UNET_ATTENTION, a1111_applied, comfy_key_map,
                            config, diffusers_targets, linear_or_conv, lora_modules, models,
                            sd_scripts_names)

from loracli.exporting import compat, convert, export

pytestmark = pytest.mark.slow

TARGETS = {  # name → (UNet targets, text-encoder targets)
    "default": (UNET_ATTENTION, TEXT_ATTENTION),
    "all-unet": ("all", TEXT_ATTENTION),
    "qv-text": (UNET_ATTENTION, ("q_proj", "v_proj")),
    "all-text": (UNET_ATTENTION, "all"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_ldm_names_equal_diffusers_own_checkpoint_conversion(layout):
    """convert.unet_to_ldm, fed to diffusers' LDM→diffusers conversion, returns every parameter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_config = config(LAYOUTS[layout][1])
    params = dict(models(layout)["unet"].named_parameters())
    ldm = {}
    for key, value in params.items():
        path, _, leaf = key.rpartition(".")
        ldm[f"model.diffusion_model.{convert.unet_to_ldm(path, unet_config)}.{leaf}"] = value
    back = convert_ldm_unet_checkpoint(ldm, unet_config)
    assert sorted(back) == sorted(params)
    assert all(back[k] is params[k] for k in params)


def _export(layout, targets, complete=True):
    family = LAYOUTS[layout][0]
    unet_config = config(LAYOUTS[layout][1])
    modules, found = lora_modules(layout, *TARGETS[targets])
    zeros = export.zero_modules(modules, found, family) if complete else []
    kohya = convert.to_kohya(modules + zeros, family, unet_config)
    expected = {convert.kohya_stem(m.component, m.path, family, unet_config): f"{m.component}.{m.path}"
                for m in modules + zeros}
    rows = {r["loader"]: r for r in compat.report([k.split(".")[0] for k in kohya], family)}
    return modules, zeros, kohya, expected, rows


def _applied(row, stems):
    return set(stems) - set(row["ignored"]) if not row["error"] else set()


@pytest.mark.parametrize("targets", sorted(TARGETS))
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_key_lands_on_its_module_under_each_loader(layout, targets):
    modules, zeros, kohya, expected, rows = _export(layout, targets)
    stems = set(expected)
    assert len(stems) == len(modules) + len(zeros) and all(k.split(".")[0] in stems for k in kohya)

    resolved = diffusers_targets(kohya, models(layout)["unet"].config, layout)
    assert isinstance(resolved, dict), resolved
    assert all(resolved[s] == expected[s] for s in resolved)
    assert set(resolved) == _applied(rows["diffusers"], stems)

    built = sd_scripts_names(layout)
    assert all(built[s] == expected[s] for s in stems & set(built))
    assert stems & set(built) == _applied(rows["sd-scripts"], stems)

    keymap = comfy_key_map(layout)
    assert all(keymap[s] == expected[s] for s in stems & set(keymap))
    assert stems & set(keymap) == _applied(rows["comfyui"], stems)

    patched = a1111_applied(sorted(stems), layout)
    assert set(patched) == _applied(rows["a1111"], stems)
    unet_config = config(LAYOUTS[layout][1])
    for stem, key in patched.items():
        component, _, path = expected[stem].partition(".")
        if component == "unet":
            assert key == "diffusion_model_" + convert.unet_to_ldm(path, unet_config).replace(".", "_")
        else:
            assert key == _a1111_text_name(layout, component, path)


OPENCLIP_LEAF = {"self_attn.q_proj": "attn_q_proj", "self_attn.k_proj": "attn_k_proj",
                 "self_attn.v_proj": "attn_v_proj", "self_attn.out_proj": "attn_out_proj",
                 "mlp.fc1": "mlp_c_fc", "mlp.fc2": "mlp_c_proj"}


def _a1111_text_name(layout, component, path):
    """The module A1111's text model names for a transformers CLIP path."""
    family = LAYOUTS[layout][0]
    lead = {"text_encoder": "0_", "text_encoder_2": "1_"}[component] if family == "sdxl" else ""
    path = path.removeprefix("text_model.")
    if (family, component) in (("sd2", "text_encoder"), ("sdxl", "text_encoder_2")):
        layer, leaf = path.removeprefix("encoder.layers.").split(".", 1)
        return f"{lead}model_transformer_resblocks_{layer}_{OPENCLIP_LEAF[leaf]}"
    return f"{lead}transformer_text_model_{path.replace('.', '_')}"


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_default_and_partial_text_targets_are_applied_whole_by_every_loader(layout):
    for targets in ("default", "qv-text", "all-text"):
        modules, zeros, kohya, expected, rows = _export(layout, targets)
        trained = {s for s, p in expected.items() if not any(f"{z.component}.{z.path}" == p for z in zeros)}
        for loader, row in rows.items():
            assert row["error"] is None, (targets, loader)
            ignored = set(row["ignored"]) & trained
            if loader in ("a1111", "sd-scripts", "diffusers") and targets == "all-text":
                # no loader but ComfyUI patches SDXL's text_projection (a Parameter in OpenCLIP)
                ignored -= {"lora_te2_text_projection"}
            assert not ignored, (targets, loader, sorted(ignored)[:5])
    assert len(zeros) == 0  # all-text needs no completion


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_qv_text_targets_get_zero_effect_k_and_out(layout):
    modules, zeros, kohya, expected, rows = _export(layout, "qv-text")
    layers = sum(m.config.num_hidden_layers for c, m in models(layout).items() if c != "unet")
    assert len(zeros) == 2 * layers  # k_proj and out_proj of every layer of every encoder
    assert {z.path.rsplit(".", 1)[-1] for z in zeros} == {"k_proj", "out_proj"}
    assert all(float(z.up.abs().max()) == 0.0 for z in zeros)
    assert all(z.rank == 4 and z.alpha == 8.0 for z in zeros)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_without_completion_q_v_text_is_dropped(layout):
    """What the completion prevents: A1111 never applies an OpenCLIP encoder's partial attention
    sets, and diffusers' load_lora_weights refuses a text encoder with only q/v (SD1 too)."""
    family = LAYOUTS[layout][0]
    modules, zeros, kohya, expected, rows = _export(layout, "qv-text", complete=False)
    assert not zeros
    resolved = diffusers_targets(kohya, models(layout)["unet"].config, layout)
    assert resolved == "Could not automatically infer state dict type"
    assert "Could not automatically infer state dict type" in rows["diffusers"]["error"]
    a1111_ignored = {s for s in rows["a1111"]["ignored"]}
    patched = a1111_applied(sorted(expected), layout)
    openclip = {"sd2": "lora_te_", "sdxl": "lora_te2_"}.get(family)
    if openclip:
        text = {s for s in expected if s.startswith(openclip)}
        assert text and text <= a1111_ignored and not text & set(patched)
    else:
        assert not a1111_ignored


@pytest.mark.parametrize("layout, dropped", [
    ("sd15", {"conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2"}),
    ("sd21", {"conv_in", "conv_out", "time_embedding_linear_1", "time_embedding_linear_2"}),
    ("sdxl", {"input_blocks_0_0", "out_2", "time_embed_0", "time_embed_2", "label_emb_0_0",
              "label_emb_0_2"}),
])
def test_every_unet_linear_and_conv_names_what_sd_scripts_drops(layout, dropped):
    modules, zeros, kohya, expected, rows = _export(layout, "all-unet")
    assert len([m for m in modules if m.component == "unet"]) == len(linear_or_conv(models(layout)["unet"]))
    assert {s.removeprefix("lora_unet_") for s in rows["sd-scripts"]["ignored"]} == dropped
    for loader in ("a1111", "comfyui", "diffusers"):
        assert rows[loader]["ignored"] == [], loader
    warning = [w for w in compat.warnings(list(rows.values())) if w.startswith("kohya sd-scripts")]
    assert len(warning) == 1 and all(f"lora_unet_{name}" in warning[0] for name in dropped)
