"""FLUX.1 and SD3 LoRA keys: diffusers module paths ↔ the original (BFL / SAI MMDiT) layout.

kohya sd-scripts writes FLUX LoRAs on Black Forest Labs' module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, …) and SD3
LoRAs on SAI's MMDiT names (`lora_unet_joint_blocks_0_x_block_attn_qkv`, …); ComfyUI and Forge
apply a `lora_unet_X` key to the native weight `X`. Where the original fuses what diffusers
splits (q, k, v — and in FLUX's single blocks the MLP input too), the separate LoRAs become one:
`lora_down` stacked, `lora_up` block-diagonal, rank and alpha × parts, so `alpha / rank` — the
scale every loader applies — is unchanged (sd-scripts networks/convert_flux_lora.py
`convert_to_sd_scripts_cat` does the same). A part with no LoRA gets zero rows in `lora_up`.

Read from: sd-scripts 48d368fa networks/lora_flux.py, networks/convert_flux_lora.py,
networks/lora_sd3.py; ComfyUI comfy/lora.py (41444b52: `lora_unet_{k}` for every native key)
and comfy/utils.py (`flux_to_diffusers`, `mmdit_to_diffusers`: the tables below).
Pure functions over `convert.LoraModule`; the tables are module constants.
"""

from __future__ import annotations

import re

from loracli.exporting.convert import ConversionError, LoraModule

# native module (inside a block) → the diffusers modules it fuses, in output order
FLUX_DOUBLE = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
FLUX_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
FLUX_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
MMDIT_JOINT = {
    "x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "x_block.attn.proj": ("attn.to_out.0",),
    "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    "x_block.attn2.proj": ("attn2.to_out.0",),
    "x_block.mlp.fc1": ("ff.net.0.proj",),
    "x_block.mlp.fc2": ("ff.net.2",),
    "x_block.adaLN_modulation.1": ("norm1.linear",),
    "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "context_block.attn.proj": ("attn.to_add_out",),
    "context_block.mlp.fc1": ("ff_context.net.0.proj",),
    "context_block.mlp.fc2": ("ff_context.net.2",),
    "context_block.adaLN_modulation.1": ("norm1_context.linear",),
}
MMDIT_TOP = {
    "context_embedder": "context_embedder",
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
# layout → ((native block list, diffusers block list, table), …), top-level renames
LAYOUTS = {
    "flux": ((("double_blocks", "transformer_blocks", FLUX_DOUBLE),
              ("single_blocks", "single_transformer_blocks", FLUX_SINGLE)), FLUX_TOP),
    "mmdit": ((("joint_blocks", "transformer_blocks", MMDIT_JOINT),), MMDIT_TOP),
}
# diffusers modules whose weight is a row-permutation of the native one (scale and shift
# swapped): no LoRA on them can be renamed faithfully (ComfyUI's `swap_scale_shift`)
SWAPPED = re.compile(r"^(norm_out\.linear|transformer_blocks\.\d+\.norm1_context\.linear)$")


def _index(layout: str) -> dict[str, tuple[str, tuple[str, ...], int]]:
    """diffusers module path pattern → (native name template, fused parts, which part)."""
    if layout not in LAYOUTS:
        raise ConversionError(f"no native key layout {layout!r} (known: {', '.join(LAYOUTS)})")
    blocks, top = LAYOUTS[layout]
    index = {}
    for native_list, diffusers_list, table in blocks:
        for native, parts in table.items():
            for i, part in enumerate(parts):
                index[f"{diffusers_list}.{{}}.{part}"] = (f"{native_list}.{{}}.{native}", parts, i)
    for native, diffusers in top.items():
        index[diffusers] = (native, (diffusers,), 0)
    return index


def native_name(path: str, layout: str) -> tuple[str, tuple[str, ...], int]:
    """("double_blocks.0.img_attn.qkv", the diffusers paths it fuses, this one's place)."""
    m = re.match(r"^([a-z_]+)\.(\d+)\.(.+)$", path)
    index = _index(layout)
    if m:
        key = f"{m.group(1)}.{{}}.{m.group(3)}"
        if key in index:
            native, parts, i = index[key]
            block = f"{m.group(1)}.{m.group(2)}."
            return native.format(m.group(2)), tuple(block + p for p in parts), i
    elif path in index:
        native, parts, i = index[path]
        return native, parts, i
    raise ConversionError(f"transformer: {path} has no equivalent in the original {layout} "
                          "layout that kohya, ComfyUI and Forge load")


def part_rows(path: str, layout: str, config: dict) -> int:
    """Output features of a diffusers module, from the transformer config (for missing parts)."""
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    if path.endswith("proj_mlp"):
        return inner * 4  # FluxSingleTransformerBlock: mlp_ratio 4
    return inner


def to_native(modules: list[LoraModule], layout: str, config: dict) -> list[LoraModule]:
    """The transformer's LoRA modules renamed (and fused) to the original layout.

    `config` is the transformer's config.json (its width sizes the zero rows of a fused part
    that has no LoRA). Other components pass through unchanged.
    """
    import torch

    groups: dict[str, dict] = {}
    out = []
    for m in modules:
        if m.component != "transformer":
            out.append(m)
            continue
        if SWAPPED.match(m.path):
            raise ConversionError(f"transformer: {m.path} stores scale and shift in the other "
                                  "order than the original layout; leave it out of lora.targets")
        native, parts, i = native_name(m.path, layout)
        group = groups.setdefault(native, {"parts": parts, "found": {}})
        group["found"][i] = m
    for native, group in sorted(groups.items()):
        parts, found = group["parts"], group["found"]
        if len(parts) == 1:
            m = found[0]
            out.append(LoraModule("transformer", native, m.down, m.up, m.alpha))
            continue
        present = [found[i] for i in sorted(found)]
        ranks = {m.rank for m in present}
        uniform = len(ranks) == 1 and len({m.alpha for m in present}) == 1
        rows = [found[i].up.shape[0] if i in found else part_rows(p, layout, config)
                for i, p in enumerate(parts)]
        rank = sum(m.rank for m in present)
        dtype = present[0].up.dtype
        down = torch.cat([m.down for m in present], dim=0)
        up = torch.zeros(sum(rows), rank, dtype=dtype)
        row = col = 0
        for i, n in enumerate(rows):
            if i in found:
                m = found[i]
                # unequal ranks or alphas: fold each part's scale into its rows, alpha = rank
                part = m.up if uniform else (m.up.float() * m.scale).to(dtype)
                up[row:row + n, col:col + m.rank] = part
                col += m.rank
            row += n
        alpha = present[0].alpha * len(present) if uniform else float(rank)
        out.append(LoraModule("transformer", native, down, up, alpha))
    return out


def native(modules: list[LoraModule], found: dict[str, dict], family, config_dir) -> tuple:
    """(modules, base modules by component) as a kohya file names them for `family`.

    For a family whose kohya layout is one of `LAYOUTS`, the transformer's modules are fused
    and renamed (`to_native`) and the base model's own module names are renamed alike, so the
    export's key check compares like with like; any other family passes through unchanged.
    """
    import json
    from pathlib import Path

    from loracli import families

    family = families.get(family) if isinstance(family, str) else family
    layout = family.kohya_unet_layout
    if layout not in LAYOUTS:
        return modules, found
    path = Path(config_dir) / family.denoiser / "config.json"
    config = json.loads(path.read_text("utf-8")) if path.is_file() else {}
    renamed = dict(found)
    if family.denoiser in found:
        names = {}
        for module, shape in found[family.denoiser].items():
            try:
                names.setdefault(native_name(module, layout)[0], shape)
            except ConversionError:
                continue  # a module with no native name cannot be in a kohya file anyway
        renamed[family.denoiser] = names
    return to_native(modules, layout, config), renamed


def kohya_family(stems: list[str], version: str):
    """The FLUX/SD3 family whose kohya file these module stems are, or None (`lora inspect`).

    kohya writes every denoiser as `lora_unet_…`; the native block names (`double_blocks`,
    `single_blocks`, `joint_blocks`) or a recorded `ss_base_model_version` tell a transformer.
    Without metadata a family is returned only when the layout's families agree on the
    version (both FLUX.1 are "flux1"; SD3.5 medium and large differ: the one that matches
    first is returned, and the caller keeps its own version).
    """
    from loracli import families

    dits = [f for f in families.all() if f.kohya_unet_layout in LAYOUTS]
    for family in dits:
        if family.base_version == version:
            return family
    for family in dits:
        prefix = family.kohya_prefixes[family.denoiser] + "_"
        blocks = tuple(prefix + b + "_" for b, _, _ in LAYOUTS[family.kohya_unet_layout][0])
        if any(s.startswith(blocks) for s in stems):
            return family
    return None


def transformer_component(stem: str, family) -> str | None:
    """The component of `family` a kohya stem belongs to (longest prefix first)."""
    for component, prefix in sorted(family.kohya_prefixes.items(), key=lambda kv: -len(kv[1])):
        if stem.startswith(prefix + "_"):
            return component
    return None
