"""Which modules of a kohya-layout LoRA each loader applies: the loaders' key rules as data.

Each rule below was read from the loader's own code at the revision named in `SOURCES`, and is
checked in tests/test_export_layouts.py against the real SD1.5, SD2.1 and SDXL module layouts (and,
for diffusers, against its own conversion code). A loader that cannot match a key prints at most a
warning and loads the rest, so a module it drops silently does nothing: `report` says which.

Rules work on kohya key stems without their component prefix (`down_blocks_0_…`,
`text_model_encoder_layers_0_self_attn_q_proj`); `completions` names the zero-effect modules an
export adds so that every loader applies a text encoder's attention LoRA.
"""

from __future__ import annotations

import re
from collections import defaultdict

from loracli.exporting import convert

LOADERS = ("a1111", "comfyui", "sd-scripts", "diffusers")
# Forge (lllyasviel/stable-diffusion-webui-forge 00f1cd3, backend/patcher/lora.py) takes its key
# maps from packages_3rdparty/comfyui_lora_collection: it follows ComfyUI's rules, not A1111's.
LABELS = {"a1111": "AUTOMATIC1111", "comfyui": "ComfyUI/Forge", "sd-scripts": "kohya sd-scripts",
          "diffusers": "diffusers"}
SOURCES = {
    "a1111": "AUTOMATIC1111/stable-diffusion-webui v1.10 extensions-builtin/Lora/networks.py "
             "(convert_diffusers_name_to_compvis, load_network, network_apply_weights)",
    "comfyui": "comfyanonymous/ComfyUI 41444b5 comfy/lora.py (model_lora_keys_unet, "
               "model_lora_keys_clip) and comfy/utils.py (unet_to_diffusers)",
    "sd-scripts": "kohya-ss/sd-scripts 48d368f networks/lora.py (LoRANetwork target classes, "
                  "create_network_from_weights)",
    "diffusers": "huggingface/diffusers 0.42.1 loaders/lora_conversion_utils.py "
                 "(_convert_non_diffusers_lora_to_diffusers) and utils/state_dict_utils.py "
                 "(convert_state_dict_to_peft)",
}

# UNet keys in the LDM layout (kohya's SDXL convention); every loader below resolves them by name.
LDM_UNET = r"(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_.+"

UNET_RULES = {
    # convert_diffusers_name_to_compvis: the regexes it knows; an LDM name falls back to
    # "lora_unet" → "diffusion_model" and is found in the LDM model's named_modules().
    "a1111": (r"conv_in", r"conv_out", r"time_embedding_linear_\d+",
              r"(down_blocks_\d+|up_blocks_\d+|mid_block)_(attentions|resnets)_\d+_.+",
              r"down_blocks_\d+_downsamplers_0_conv", r"up_blocks_\d+_upsamplers_0_conv", LDM_UNET),
    # model_lora_keys_unet: every LDM weight, plus every diffusers name in unet_to_diffusers
    # (UNET_MAP_BASIC, UNET_MAP_RESNET, UNET_MAP_ATTENTIONS, TRANSFORMER_BLOCKS, samplers).
    "comfyui": (r"conv_in|conv_out|(time_embedding|add_embedding|class_embedding)_linear_[12]",
                r"(down_blocks_\d+|up_blocks_\d+|mid_block)_resnets_\d+_"
                r"(conv1|conv2|time_emb_proj|conv_shortcut|norm1|norm2)",
                r"(down_blocks_\d+|up_blocks_\d+|mid_block)_attentions_\d+_(proj_in|proj_out|norm|"
                r"transformer_blocks_\d+_(norm[123]|attn[12]_to_(q|k|v|out_0)|ff_net_0_proj|ff_net_2))",
                r"down_blocks_\d+_downsamplers_0_conv", r"up_blocks_\d+_upsamplers_0_conv", LDM_UNET),
    # LoRANetwork builds modules only inside Transformer2DModel, ResnetBlock2D, Downsample2D and
    # Upsample2D (the last three when loading from weights): conv_in, conv_out, time_embedding
    # (SDXL: input_blocks_0_0, out_2, time_embed, label_emb) have no module and are dropped.
    "sd-scripts": (r"(down_blocks_\d+|up_blocks_\d+|mid_block)_(attentions|resnets)_\d+_.+",
                   r"(down_blocks|up_blocks)_\d+_(downsamplers|upsamplers)_\d+_.+",
                   r"input_blocks_([1-9]|\d\d+)_\d+_.+", r"middle_block_\d+_.+",
                   r"output_blocks_\d+_\d+_.+"),
    # _convert_unet_lora_key renames every SD UNet Linear/Conv of either layout.
    "diffusers": (r".+",),
}

# FLUX/SD3 kohya files name the original modules (loracli.exporting.convert_dit), per layout.
DIT_BLOCKS = {"flux": r"(double_blocks|single_blocks)_\d+_.+", "mmdit": r"joint_blocks_\d+_.+"}
DIT_RULES = {
    # A1111 has no FLUX or SD3 model: none of a transformer's keys apply there.
    "a1111": {"flux": (), "mmdit": ()},
    # model_lora_keys_unet: `lora_unet_{k}` for every weight k of the native diffusion_model.
    "comfyui": {"flux": (DIT_BLOCKS["flux"], r"(img_in|txt_in|final_layer_linear|"
                         r"(time_in|vector_in|guidance_in)_(in|out)_layer)"),
                "mmdit": (DIT_BLOCKS["mmdit"], r"(context_embedder|x_embedder_proj|"
                          r"final_layer_linear|(t|y)_embedder_mlp_[02])")},
    # networks/lora_flux.py: modules inside DoubleStreamBlock and SingleStreamBlock;
    # networks/lora_sd3.py: inside JointBlock (its embedder modules only with emb_dims).
    "sd-scripts": {"flux": (DIT_BLOCKS["flux"],), "mmdit": (DIT_BLOCKS["mmdit"],)},
    # _convert_kohya_flux_lora_to_diffusers converts the blocks (at FLUX.1's full sizes);
    # diffusers has no kohya converter for SD3.
    "diffusers": {"flux": (DIT_BLOCKS["flux"],), "mmdit": ()},
}

TEXT_RULES = {
    # transformers CLIP (SD1, SDXL's first encoder): any Linear of an encoder layer. OpenCLIP
    # encoders are handled by the OpenCLIP rule below.
    "a1111": (r"text_model_encoder_layers_\d+_.+",),
    # model_lora_keys_clip: LORA_CLIP_MAP for layers 0-31; lora_te2_text_projection for clip_g.
    "comfyui": (r"text_model_encoder_layers_([12]?\d|3[01])_(mlp_fc1|mlp_fc2|self_attn_(q|k|v|out)_proj)",),
    # TEXT_ENCODER_TARGET_REPLACE_MODULE = CLIPAttention, CLIPSdpaAttention, CLIPMLP.
    "sd-scripts": (r"text_model_encoder_layers_\d+_(self_attn|mlp)_.+",),
    # _convert_text_encoder_lora_key: self_attn, mlp and text_projection.
    "diffusers": (r"text_model_encoder_layers_\d+_(self_attn_(q|k|v|out)_proj|mlp_fc[12])",
                  r"text_projection"),
}
# ComfyUI also patches the text_projection of the encoders a family names in
# `projection_encoders` (lora_te2_text_projection: SDXL's clip_g).
EXTRA_TEXT = {"comfyui": (r"text_projection",)}

# A1111 runs the encoders a family names in `openclip_encoders` (SD2's, SDXL's second) as OpenCLIP:
# MLP Linears are patched directly, the attention is one nn.MultiheadAttention, patched only when
# q, k, v and out are all present.
OPENCLIP_DIRECT = r"text_model_encoder_layers_\d+_mlp_fc[12]"
ATTENTION = re.compile(r"^(text_model_encoder_layers_\d+_self_attn_)(q|k|v|out)_proj$")
PROJECTIONS = ("q", "k", "v", "out")

# diffusers infers a text encoder's state-dict type from an out_proj or an MLP key; without one,
# load_lora_weights raises "Could not automatically infer state dict type" and loads nothing.
DIFFUSERS_TEXT_NEEDS = re.compile(r"(self_attn_out_proj|mlp_fc[12])$")


def split(stem: str, family: str | None = None) -> tuple[str, str]:
    """`lora_te2_text_model_…` → ("text_encoder_2", "text_model_…"); `family`'s prefixes first
    (FLUX's `lora_unet` is its transformer)."""
    from loracli import families

    components = convert.kohya_components()
    if family:
        components = {**components, **{p: c for c, p in
                                       families.get(family).kohya_prefixes.items()}}
    for prefix in sorted(components, key=len, reverse=True):
        if stem.startswith(prefix + "_"):
            return components[prefix], stem[len(prefix) + 1:]
    return "", stem


def report(stems: list[str], family: str) -> list[dict]:
    """Per loader: how many of the file's modules it applies, and which it ignores."""
    by_component = defaultdict(list)
    for stem in sorted(set(stems)):
        component, name = split(stem, family)
        by_component[component].append((stem, name))
    rows = []
    for loader in LOADERS:
        applied, ignored = [], []
        for component, names in by_component.items():
            for stem, ok in _applies(loader, family, component, names):
                (applied if ok else ignored).append(stem)
        error = _refusal(loader, by_component)
        if error:
            applied, ignored = [], sorted(set(stems))
        rows.append({"loader": loader, "label": LABELS[loader], "applied": len(applied),
                     "total": len(set(stems)), "ignored": sorted(ignored), "error": error,
                     "source": SOURCES[loader]})
    return rows


def _applies(loader: str, family: str, component: str, names: list[tuple[str, str]]):
    if component == "unet":
        rules = UNET_RULES[loader]
    elif component == "transformer":
        from loracli import families

        rules = DIT_RULES[loader].get(families.get(family).kohya_unet_layout, ())
    elif component:
        rules = TEXT_RULES[loader] + (EXTRA_TEXT.get(loader, ()) if component in
                                      _encoders(family, "projection_encoders") else ())
    else:
        rules = ()
    openclip = loader == "a1111" and component in _encoders(family, "openclip_encoders")
    present = {name for _, name in names}
    for stem, name in names:
        if openclip:
            m = ATTENTION.match(name)
            yield stem, bool(re.fullmatch(OPENCLIP_DIRECT, name)) or bool(
                m and all(f"{m.group(1)}{p}_proj" in present for p in PROJECTIONS))
        else:
            yield stem, any(re.fullmatch(rule, name) for rule in rules)


def _encoders(family: str, which: str) -> tuple[str, ...]:
    """A family's `openclip_encoders` or `projection_encoders` (none when the family is unknown)."""
    from loracli import families

    return getattr(families.get(family), which) if family else ()


def _refusal(loader: str, by_component: dict) -> str | None:
    if loader != "diffusers":
        return None
    for component, names in by_component.items():
        if component.startswith("text_encoder") and not any(
                DIFFUSERS_TEXT_NEEDS.search(name) for _, name in names):
            return (f"load_lora_weights raises 'Could not automatically infer state dict type': "
                    f"the {component} part has no out_proj and no MLP module")
    return None


def completions(paths: dict[str, list[str]], family: str) -> dict[str, list[str]]:
    """Text-encoder module paths to add with a zero update (lora_up = 0) so that every loader
    applies the trained ones: the missing members of each layer's q/k/v/out set, where A1111's
    OpenCLIP path needs all four or diffusers needs an out_proj to read the encoder at all."""
    out = {}
    for component, names in paths.items():
        if not component.startswith("text_encoder"):
            continue
        openclip = component in _encoders(family, "openclip_encoders")
        unreadable = not any(p.endswith(("self_attn.out_proj", "mlp.fc1", "mlp.fc2")) for p in names)
        if not (openclip or unreadable):
            continue
        layers = defaultdict(set)
        for path in names:
            m = re.match(r"^(.*\.self_attn\.)(q|k|v|out)_proj$", path)
            if m:
                layers[m.group(1)].add(m.group(2))
        missing = [f"{layer}{p}_proj" for layer, have in sorted(layers.items())
                   for p in PROJECTIONS if p not in have]
        if missing:
            out[component] = missing
    return out


def warnings(rows: list[dict], limit: int = 6) -> list[str]:
    """One line per loader that ignores modules, naming them."""
    lines = []
    for row in rows:
        if row["error"]:
            lines.append(f"{row['label']} will not load this file: {row['error']}")
        elif row["ignored"]:
            names = ", ".join(row["ignored"][:limit])
            more = f" … and {len(row['ignored']) - limit} more" if len(row["ignored"]) > limit else ""
            lines.append(f"{row['label']} ignores {len(row['ignored'])} of {row['total']} modules "
                         f"(they load and do nothing): {names}{more}")
    return lines


def summary(rows: list[dict]) -> list[str]:
    """`AUTOMATIC1111: 40 of 40 modules applied` per loader."""
    return [f"{row['label']}: {row['applied']} of {row['total']} modules applied"
            + (" (will not load)" if row["error"] else "") for row in rows]
