"""The real SD1.5, SD2.1 and SDXL module layouts on the meta device (no weights, no memory), a
LoRA over them in common form, and each loader's key handling re-run as an independent oracle:

- diffusers: its own conversion code (`_convert_non_diffusers_lora_to_diffusers`, then the state
  dict conversions `load_lora_weights` applies), imported and run;
- kohya sd-scripts: `LoRANetwork.create_modules`' rule (Linear/Conv2d children of modules whose
  class is Transformer2DModel, ResnetBlock2D, Downsample2D, Upsample2D, CLIPAttention, CLIPMLP)
  run on the real models' classes;
- AUTOMATIC1111: `convert_diffusers_name_to_compvis` and `load_network`'s fallbacks transcribed,
  looked up in the module names its LDM / OpenCLIP models have (`network_layer_mapping`);
- ComfyUI: `model_lora_keys_unet`/`model_lora_keys_clip`'s key map transcribed.
LDM names come from `convert.unet_to_ldm`, which the tests first prove equal to diffusers' own
LDM→diffusers checkpoint conversion for every parameter.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from loracli.exporting import convert

HERE = Path(__file__).parent / "layouts"
LAYOUTS = {  # name → (family, unet config, {component: text config})
    "sd15": ("sd1", "sd15_unet", {"text_encoder": "clip_l"}),
    "sd21": ("sd2", "sd21_unet", {"text_encoder": "openclip_h"}),
    "sdxl": ("sdxl", "sdxl_unet", {"text_encoder": "clip_l", "text_encoder_2": "openclip_bigg"}),
}
UNET_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def config(name: str) -> dict:
    return json.loads((HERE / f"{name}.json").read_text())


@lru_cache(maxsize=None)
def models(layout: str) -> dict:
    """{component: model on the meta device} for one layout."""
    import torch
    import transformers
    from diffusers import UNet2DConditionModel

    _, unet, texts = LAYOUTS[layout]
    with torch.device("meta"):
        out = {"unet": UNet2DConditionModel.from_config(config(unet))}
        for component, name in texts.items():
            cfg = config(name)
            cls = getattr(transformers, cfg["architectures"][0])
            out[component] = cls(transformers.CLIPTextConfig(**cfg))
    return out


def linear_or_conv(model) -> dict[str, tuple]:
    import torch

    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def targeted(model, targets) -> dict[str, tuple]:
    """What peft's target_modules picks: the name, or a dotted suffix, of a Linear/Conv2d."""
    if targets == "all":
        return linear_or_conv(model)
    return {n: s for n, s in linear_or_conv(model).items()
            if any(n == t or n.endswith("." + t) for t in targets)}


def lora_modules(layout: str, unet_targets, text_targets, rank: int = 4, alpha: float = 8.0):
    """A LoRA in common form over the layout (meta tensors) and the layout's module shapes."""
    import torch

    found, modules = {}, []
    for component, model in models(layout).items():
        found[component] = linear_or_conv(model)
        picked = targeted(model, unet_targets if component == "unet" else text_targets)
        for path, shape in sorted(picked.items()):
            down = torch.empty(rank, *shape[1:], device="meta")
            up = torch.empty(shape[0], rank, *([1, 1] if len(shape) == 4 else []), device="meta")
            modules.append(convert.LoraModule(component, path, down, up, alpha))
    return modules, found


# ---------------------------------------------------------------------------- oracles

def diffusers_targets(kohya: dict, unet_config, layout: str) -> dict[str, str] | str:
    """kohya stem → "component.module path" as diffusers' load_lora_weights resolves it, or the
    error message it raises."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers,
                                                  convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    tagged = {k: _Tagged(k.split(".")[0], v) for k, v in kohya.items()}
    state = _maybe_map_sgm_blocks_to_diffusers(dict(tagged), unet_config)
    state, _alphas = _convert_non_diffusers_lora_to_diffusers(state)
    out = {}
    try:
        for component in ("unet", "text_encoder", "text_encoder_2"):
            part = {k.removeprefix(component + "."): v for k, v in state.items()
                    if k.startswith(component + ".")}
            if not part:
                continue
            if component == "unet":
                part = convert_unet_state_dict_to_peft(part)
            else:
                part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
                if not hasattr(models(layout)[component], "text_model"):
                    part = {k.removeprefix("text_model."): v for k, v in part.items()}
            for key, value in part.items():
                if key.endswith(".lora_A.weight"):
                    out[value.stem] = f"{component}.{key[:-len('.lora_A.weight')]}"
    except ValueError as e:
        return str(e)
    return out


class _Tagged:
    """A tensor stand-in that remembers which kohya module it came from through the renames."""

    def __init__(self, stem, value):
        self.stem, self.value, self.shape = stem, value, value.shape

    def item(self):
        return float(self.value.item())

    def __mul__(self, other):
        return self

    __rmul__ = __mul__


def sd_scripts_names(layout: str) -> dict[str, str]:
    """lora_name → "component.path" of every module sd-scripts' LoRANetwork builds from weights."""
    family = LAYOUTS[layout][0]
    unet_classes = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
    text_classes = ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP")
    # LoRANetwork.LORA_PREFIX_UNET / _TEXT_ENCODER (SDXL: _TEXT_ENCODER1 / _TEXT_ENCODER2)
    prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1" if family == "sdxl" else "lora_te",
                "text_encoder_2": "lora_te2"}
    unet_config = config(LAYOUTS[layout][1])
    names = {}
    for component, model in models(layout).items():
        classes = unet_classes if component == "unet" else text_classes
        for name, module in model.named_modules():
            if type(module).__name__ not in classes:
                continue
            for child, sub in module.named_modules():
                if type(sub).__name__ in ("Linear", "Conv2d"):
                    path = f"{name}.{child}"
                    if component == "unet" and family == "sdxl":
                        kohya = convert.unet_to_ldm(path, unet_config)   # sdxl_original_unet names
                    elif component != "unet" and not hasattr(model, "text_model"):
                        kohya = "text_model." + path                     # transformers 4 CLIP names
                    else:
                        kohya = path
                    names[f"{prefixes[component]}_{kohya.replace('.', '_')}"] = f"{component}.{path}"
    return names


A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0",
                "norm2": "out_layers_0", "time_emb_proj": "emb_layers_1",
                "conv_shortcut": "skip_connection"}


def a1111_key(stem: str, is_sd2: bool) -> str:
    """convert_diffusers_name_to_compvis, transcribed."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda m: f"diffusion_model_input_blocks_0_0{m[0]}"),
        (r"lora_unet_conv_out(.*)", lambda m: f"diffusion_model_out_2{m[0]}"),
        (r"lora_unet_time_embedding_linear_(\d+)(.*)",
         lambda m: f"diffusion_model_time_embed_{int(m[0]) * 2 - 2}{m[1]}"),
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[0]) * 3 + int(m[2])}_"
                   f"{1 if m[1] == 'attentions' else 0}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else int(m[1]) * 2}_"
                   f"{_suffix(m[0], m[2])}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[0]) * 3 + int(m[2])}_"
                   f"{1 if m[1] == 'attentions' else 0}_{_suffix(m[1], m[3])}"),
        (r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
         lambda m: f"diffusion_model_input_blocks_{3 + int(m[0]) * 3}_0_op"),
        (r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"diffusion_model_output_blocks_{2 + int(m[0]) * 3}_{2 if int(m[0]) > 0 else 1}_conv"),
        (r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: (f"model_transformer_resblocks_{m[0]}_{_openclip(m[1])}" if is_sd2
                    else f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}")),
        (r"lora_te2_text_model_encoder_layers_(\d+)_(.+)",
         lambda m: f"1_model_transformer_resblocks_{m[0]}_{_openclip(m[1])}"),
    ]
    for pattern, build in rules:
        m = re.match(pattern, stem)
        if m:
            return build(m.groups())
    return stem


def _suffix(kind: str, rest: str) -> str:
    return A1111_RESNET.get(rest, rest) if kind == "resnets" else rest


def _openclip(rest: str) -> str:
    return rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj") \
        .replace("self_attn", "attn")


def a1111_layer_names(layout: str) -> dict[str, str]:
    """network_layer_mapping: A1111 module name → kind ("linear", "mha") for one layout."""
    family, unet_cfg, texts = LAYOUTS[layout]
    names = {}
    for path in linear_or_conv(models(layout)["unet"]):
        names["diffusion_model_" + convert.unet_to_ldm(path, config(unet_cfg)).replace(".", "_")] = "linear"
    for index, (component, model) in enumerate(models(layout).items()):
        if component == "unet":
            continue
        sdxl = "sdxl" == family
        lead = f"{index - 1}_" if sdxl else ""
        openclip = (family, component) in (("sd2", "text_encoder"), ("sdxl", "text_encoder_2"))
        layers = model.config.num_hidden_layers
        for i in range(layers):
            if openclip:
                base = f"{lead}model_transformer_resblocks_{i}_"
                names[base + "attn"] = "mha"
                names[base + "attn_out_proj"] = "mha-out"   # patched only through the MHA
                names[base + "mlp_c_fc"] = names[base + "mlp_c_proj"] = "linear"
            else:
                base = f"{lead}transformer_text_model_encoder_layers_{i}_"
                for leaf in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                             "self_attn_out_proj", "mlp_fc1", "mlp_fc2"):
                    names[base + leaf] = "linear"
    return names


def a1111_applied(stems: list[str], layout: str) -> dict[str, str]:
    """stem → the A1111 module it patches, for the stems A1111 applies (load_network +
    network_apply_weights)."""
    layer = a1111_layer_names(layout)
    keys, found = {}, {}
    for stem in stems:
        key = a1111_key(stem, LAYOUTS[layout][0] == "sd2")
        kind = layer.get(key)
        if kind is None and (m := re.match(r"(.*)_([qkv]_proj)$", key)):
            kind = layer.get(m.group(1))
        if kind is None and "lora_unet" in stem:
            key = stem.replace("lora_unet", "diffusion_model")
            kind = layer.get(key)
        elif kind is None and "lora_te1_text_model" in stem:
            key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
            kind = layer.get(key)
        if kind is not None:
            keys[stem], found[stem] = key, kind
    applied = {}
    present = set(keys.values())
    for stem, key in keys.items():
        if found[stem] == "linear":
            applied[stem] = key
        else:   # an OpenCLIP attention: network_apply_weights on the MultiheadAttention
            mha = re.sub(r"_(q|k|v|out)_proj$", "", key)
            if all(f"{mha}_{p}_proj" in present for p in ("q", "k", "v", "out")):
                applied[stem] = key
    return applied


COMFY_UNET_SUFFIXES = {
    "resnets": {"conv1", "conv2", "time_emb_proj", "conv_shortcut", "norm1", "norm2"},
    "attentions": {"proj_in", "proj_out", "norm"},
    "transformer_blocks": {"norm1", "norm2", "norm3", "attn1.to_q", "attn1.to_k", "attn1.to_v",
                           "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
                           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"},
    "basic": {"class_embedding.linear_1", "class_embedding.linear_2", "add_embedding.linear_1",
              "add_embedding.linear_2", "conv_in", "conv_norm_out", "conv_out",
              "time_embedding.linear_1", "time_embedding.linear_2"},
}
COMFY_CLIP = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj",
              "self_attn.out_proj")


def comfy_key_map(layout: str) -> dict[str, str]:
    """model_lora_keys_unet + model_lora_keys_clip, transcribed: lora key → "component.path"."""
    family, unet_cfg, texts = LAYOUTS[layout]
    out = {}
    for path in linear_or_conv(models(layout)["unet"]):
        ldm = convert.unet_to_ldm(path, config(unet_cfg))
        out["lora_unet_" + ldm.replace(".", "_")] = f"unet.{path}"
        if _comfy_knows(path):
            out["lora_unet_" + path.replace(".", "_")] = f"unet.{path}"
    for component in texts:
        layers = models(layout)[component].config.num_hidden_layers
        prefix = "lora_te2" if component == "text_encoder_2" else \
            ("lora_te1" if family == "sdxl" else "lora_te")
        inner = "text_model." if component == "text_encoder_2" else ""
        for b in range(min(layers, 32)):
            for c in COMFY_CLIP:
                out[f"{prefix}_text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = \
                    f"{component}.{inner}encoder.layers.{b}.{c}"
        if component == "text_encoder_2":
            out["lora_te2_text_projection"] = f"{component}.text_projection"
    return out


def _comfy_knows(path: str) -> bool:
    if path in COMFY_UNET_SUFFIXES["basic"]:
        return True
    if re.match(r"^(down|up)_blocks\.\d+\.(downsamplers|upsamplers)\.0\.conv$", path):
        return True
    m = re.match(r"^(?:(?:down|up)_blocks\.\d+|mid_block)\.(resnets|attentions)\.\d+\.(.+)$", path)
    if not m:
        return False
    if m.group(1) == "resnets":
        return m.group(2) in COMFY_UNET_SUFFIXES["resnets"]
    t = re.match(r"^transformer_blocks\.\d+\.(.+)$", m.group(2))
    return (t.group(1) in COMFY_UNET_SUFFIXES["transformer_blocks"] if t
            else m.group(2) in COMFY_UNET_SUFFIXES["attentions"])


def print_reports() -> None:
    """The per-loader report for the default targets and every UNet Linear/Conv2d, per layout:
    `PYTHONPATH=.:tests python tests/export_layouts.py`."""
    from loracli.exporting import compat, export

    targets = {"default targets": (UNET_ATTENTION, TEXT_ATTENTION),
               "every UNet Linear/Conv2d (+ default text)": ("all", TEXT_ATTENTION),
               "text q_proj/v_proj only, as completed by lora export": (UNET_ATTENTION, ("q_proj", "v_proj")),
               "text q_proj/v_proj only, not completed": (UNET_ATTENTION, ("q_proj", "v_proj"))}
    for layout, (family, unet_cfg, _) in LAYOUTS.items():
        for label, (unet_targets, text_targets) in targets.items():
            modules, found = lora_modules(layout, unet_targets, text_targets)
            zeros = export.zero_modules(modules, found, family) if "not" not in label else []
            kohya = convert.to_kohya(modules + zeros, family, config(unet_cfg))
            rows = compat.report([k.split(".")[0] for k in kohya], family)
            extra = f", {len(zeros)} zero-effect added" if zeros else ""
            print(f"{layout} ({family}), {label}: {len(modules)} modules{extra}")
            for line in compat.summary(rows):
                print(f"  {line}")
            for line in compat.warnings(rows):
                print(f"  warning: {line}")


if __name__ == "__main__":
    print_reports()
