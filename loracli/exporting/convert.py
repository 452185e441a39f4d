"""LoRA key conversion as pure functions: `state_dict in → state_dict out`, tables as constants.

Everything meets in one common form, a list of `LoraModule` (component, module path, down, up,
alpha), so that every writer applies `alpha / rank × strength`, the scale every loader uses:

- peft (`lora_A`/`lora_B` + `adapter_config.json`) → common: alpha = scaling × r, i.e.
  `lora_alpha` (rsLoRA: `lora_alpha × √r`), per module when the config has patterns.
- common → kohya/A1111 (`lora_unet_…`, `lora_te_text_model_…`, `.lora_down`/`.lora_up`/`.alpha`):
  a pure rename, no transpose. SD1/SD2 UNet names use the diffusers layout; SDXL UNet names use
  the original LDM layout (`lora_unet_input_blocks_4_1_…`) by kohya's convention.
- peft → diffusers (`unet.….lora_A.weight` + `lora_adapter_metadata` in the header).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# kohya prefixes of models no registered family trains yet (SD3's T5), so `lora inspect` reads them
OTHER_KOHYA_PREFIXES = {"lora_te3": "text_encoder_3"}
KOHYA_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}

# transformers 5 CLIPTextModel paths start at `encoder.`; WebUI keys must read `text_model_encoder_`.
CLIP_TEXT_MODEL_ROOTS = ("embeddings.", "encoder.", "final_layer_norm")

# diffusers UNet → original LDM (sgm) UNet names, SDXL's kohya layout.
UNET_TOP_TO_LDM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
MID_TO_LDM = {"resnets.0": "middle_block.0", "attentions.0": "middle_block.1",
              "resnets.1": "middle_block.2"}
_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)"
                    r"\.(\d+)\.(.+)$")
_MID = re.compile(r"^mid_block\.(resnets\.\d+|attentions\.0)\.(.+)$")


class ConversionError(ValueError):
    """A state dict that cannot be converted faithfully (the caller turns it into a LoraError)."""


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update: W += strength × alpha / rank × up @ down."""

    component: str   # unet | text_encoder | text_encoder_2
    path: str        # the module's dotted path in the diffusers/transformers model
    down: Any        # [r, in] or [r, in, kh, kw]   (peft lora_A, kohya lora_down)
    up: Any          # [out, r] or [out, r, 1, 1]   (peft lora_B, kohya lora_up)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self):
        """The full weight update at strength 1, in fp32 (`scale × up @ down`)."""
        up, down = self.up.float(), self.down.float()
        if down.dim() == 4:
            return self.scale * (up.flatten(1) @ down.flatten(1)).reshape(
                up.shape[0], *down.shape[1:])
        return self.scale * (up @ down)


# ---------------------------------------------------------------------------- peft → common

def peft_alpha(config: dict, path: str, rank: int) -> float:
    """The kohya alpha (scaling × r) that reproduces peft's scaling for one module."""
    alpha = float(config.get("lora_alpha", rank))
    patterns = config.get("alpha_pattern") or {}
    if patterns:
        from peft.utils.other import get_pattern_key  # peft's own matching rule

        key = get_pattern_key(list(patterns), path)
        alpha = float(patterns.get(key, alpha))
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)
    return alpha


def from_peft(component: str, state_dict: dict, config: dict) -> list[LoraModule]:
    """A peft adapter (`get_peft_model_state_dict` + `LoraConfig.to_dict()`) in common form."""
    if config.get("use_dora"):
        raise ConversionError(
            f"{component}: DoRA adapters (use_dora) cannot be written as a kohya/diffusers LoRA "
            "without changing their effect")
    if config.get("peft_type", "LORA") not in ("LORA", None):
        raise ConversionError(f"{component}: adapter type {config.get('peft_type')} is not LoRA")
    downs, ups = {}, {}
    for key, tensor in state_dict.items():
        key = key.removeprefix("base_model.model.")  # PeftModel.save_pretrained's prefix
        if key.endswith(".lora_A.weight"):
            downs[key[: -len(".lora_A.weight")]] = tensor
        elif key.endswith(".lora_B.weight"):
            ups[key[: -len(".lora_B.weight")]] = tensor
        else:
            raise ConversionError(f"{component}: {key} is not a plain LoRA tensor "
                                  "(DoRA, lora_bias or modules_to_save cannot be exported)")
    if set(downs) != set(ups):
        missing = sorted(set(downs) ^ set(ups))[0]
        raise ConversionError(f"{component}: {missing} has only one of lora_A/lora_B")
    return [LoraModule(component, path, downs[path], ups[path],
                       peft_alpha(config, path, int(downs[path].shape[0])))
            for path in sorted(downs)]


# ---------------------------------------------------------------------------- common → kohya

def unet_to_ldm(path: str, unet_config: dict) -> str:
    """A diffusers UNet module path in the original LDM layout (`input_blocks.4.1.…`)."""
    if path in UNET_TOP_TO_LDM:
        return UNET_TOP_TO_LDM[path]
    per_level = int(_layers_per_block(unet_config)) + 1
    m = _BLOCK.match(path)
    if m:
        side, level, kind, index, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if side == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(level + 1) * per_level}.0.{_rename(rest, {'conv': 'op'})}"
            block = level * per_level + index + 1
        else:
            if kind == "upsamplers":
                has_attn = "CrossAttn" in unet_config["up_block_types"][level]
                return f"output_blocks.{level * per_level + per_level - 1}.{2 if has_attn else 1}.{rest}"
            block = level * per_level + index
        ldm = "input_blocks" if side == "down_blocks" else "output_blocks"
        if kind == "resnets":
            return f"{ldm}.{block}.0.{_rename(rest, RESNET_TO_LDM)}"
        return f"{ldm}.{block}.1.{rest}"
    m = _MID.match(path)
    if m:
        rest = m.group(2)
        if m.group(1).startswith("resnets"):
            rest = _rename(rest, RESNET_TO_LDM)
        if m.group(1) not in MID_TO_LDM:
            raise ConversionError(f"unet: {path} has no LDM equivalent")
        return f"{MID_TO_LDM[m.group(1)]}.{rest}"
    raise ConversionError(f"unet: {path} has no LDM equivalent")


def _layers_per_block(unet_config: dict) -> int:
    lpb = unet_config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        if len(set(lpb)) != 1:
            raise ConversionError("unet: layers_per_block differs between blocks; no LDM layout")
        lpb = lpb[0]
    return int(lpb)


def _rename(rest: str, table: dict) -> str:
    head, _, tail = rest.partition(".")
    if head not in table:
        raise ConversionError(f"unet: resnet module {head!r} has no LDM equivalent")
    return table[head] + (f".{tail}" if tail else "")


def kohya_stem(component: str, path: str, family, unet_config: dict | None = None) -> str:
    """`lora_unet_down_blocks_0_…`, `lora_te_text_model_encoder_layers_0_…`, `lora_te2_…`.

    `family` (a `Family` or its name) gives the prefix per component and whether UNet names
    keep the diffusers layout or take the original LDM one (kohya's SDXL convention).
    """
    from loracli import families

    family = families.get(family) if isinstance(family, str) else family
    prefixes = family.kohya_prefixes
    if component not in prefixes:
        raise ConversionError(f"{component}: no kohya prefix for family {family.name!r}")
    if component == "unet":
        name = unet_to_ldm(path, unet_config or {}) if family.kohya_unet_layout == "ldm" else path
    elif path.startswith(CLIP_TEXT_MODEL_ROOTS):
        name = "text_model." + path
    else:
        name = path  # CLIPTextModelWithProjection keeps `text_model.`; `text_projection` sits outside
    return f"{prefixes[component]}_{name.replace('.', '_')}"


def to_kohya(modules: list[LoraModule], family, unet_config: dict | None = None,
             dtype=None) -> dict:
    """The kohya/A1111 state dict. Alpha is stored fp32 so rsLoRA's √r survives an fp16 file."""
    import torch

    out = {}
    for m in modules:
        stem = kohya_stem(m.component, m.path, family, unet_config)
        if f"{stem}.alpha" in out:
            raise ConversionError(f"{m.component}: two modules map to {stem}")
        out[f"{stem}.lora_down.weight"] = _cast(m.down, dtype)
        out[f"{stem}.lora_up.weight"] = _cast(m.up, dtype)
        out[f"{stem}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)
    return out


def _cast(tensor, dtype):
    t = tensor.detach().contiguous()
    return t.to(dtype) if dtype is not None else t


# ---------------------------------------------------------------------------- common → diffusers

def peft_to_diffusers(adapters: dict[str, tuple[dict, dict]], dtype=None) -> tuple[dict, dict]:
    """`pytorch_lora_weights.safetensors` tensors and header, the layout `save_lora_weights` writes.

    The peft tensors (DoRA magnitudes included) get their component as a prefix; the adapter
    configs travel in the `lora_adapter_metadata` header key, prefixed the same way, so
    `load_lora_weights` rebuilds the exact LoraConfig: alpha, rsLoRA, DoRA and patterns included.
    """
    tensors, packed = {}, {}
    for component, (state_dict, config) in adapters.items():
        for key, tensor in state_dict.items():
            tensors[f"{component}.{key.removeprefix('base_model.model.')}"] = _cast(tensor, dtype)
        clean = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        # dropout is for training: diffusers builds the LoRA layers in train mode, so a
        # non-zero lora_dropout would drop activations in every image it draws
        if clean.get("lora_dropout"):
            clean["lora_dropout"] = 0.0
        packed.update({f"{component}.{k}": v for k, v in clean.items()})
    header = {"format": "pt"}
    if packed:
        header["lora_adapter_metadata"] = json.dumps(packed, indent=2, sort_keys=True)
    return tensors, header


def kohya_components() -> dict[str, str]:
    """kohya prefix → component, over every registered family (the first family's wins)."""
    from loracli import families

    out = dict(OTHER_KOHYA_PREFIXES)
    for family in families.all():
        for component, prefix in family.kohya_prefixes.items():
            out.setdefault(prefix, component)
    return out
