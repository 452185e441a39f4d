"""Stable Diffusion 1.x, 2.x and XL: one dataclass, three instances, no name tests.

What differs between them is data (text encoders, kohya prefixes, versions) and two small
functions: SD1/SD2 condition the UNet on one CLIP encoder's last hidden state; SDXL on two
encoders' penultimate states side by side, the second one's pooled embedding, and the
size/crop "time ids". Everything else (VAE geometry, the DDPM objectives) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from loracli.errors import LoraError
from loracli.families.base import DIFFUSION, Configs, Geometry, RunKind, vae_geometry
from loracli.families.objectives import DDPM_OBJECTIVES

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def _tokenize(tokenizer, captions):
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_single(encoders, tokenizers, captions, device) -> dict:
    """SD1/SD2: the one encoder's last hidden state."""
    (encoder,), (tokenizer,) = encoders, tokenizers
    ids = _tokenize(tokenizer, captions).to(device)
    return {"hidden": encoder(ids)[0]}


def conditioning_single(text: dict, sizes: dict) -> dict:
    return {"encoder_hidden_states": text["hidden"]}


def forward(denoiser, noisy, timesteps, cond: dict):
    """The UNet's prediction: every SD family calls its UNet alike."""
    return denoiser(noisy, timesteps, **cond).sample


def encode_dual(encoders, tokenizers, captions, device) -> dict:
    """SDXL: penultimate hidden states of both encoders side by side, pooled from the second."""
    import torch

    states, pooled = [], None
    for encoder, tokenizer in zip(encoders, tokenizers):
        ids = _tokenize(tokenizer, captions).to(device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    return {"hidden": torch.cat(states, dim=-1), "pooled": pooled}


def conditioning_dual(text: dict, sizes: dict) -> dict:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per image."""
    import torch

    time_ids = torch.cat([sizes["original_size"], sizes["crop_top_left"], sizes["target_size"]],
                         dim=1).to(text["hidden"].device, text["hidden"].dtype)
    return {"encoder_hidden_states": text["hidden"],
            "added_cond_kwargs": {"text_embeds": text["pooled"], "time_ids": time_ids}}


@dataclass(frozen=True)
class StableDiffusion:
    """A UNet + AutoencoderKL + CLIP family trained with the DDPM objectives."""

    name: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    pipeline: str
    encode: Callable
    conditioning: Callable
    recognizes: Callable[[Configs], bool]
    recognizes_checkpoint: Callable[[list], bool]
    configs_from: Mapping[str, str]        # prediction type → cached alias with its configs
    kohya_prefixes: Mapping[str, str]
    base_version: str
    modelspec_prefix: str
    modelspec_architectures: Mapping[str, str]  # prediction type → modelspec.architecture
    modelspec_implementation: str = "diffusers"
    kohya_unet_layout: str = "diffusers"
    ss_v2: bool = False
    context_width: int | None = None
    unet_targets: tuple[str, ...] = ATTENTION
    text_targets: tuple[str, ...] = CLIP_ATTENTION
    objectives: Mapping = field(default_factory=lambda: DDPM_OBJECTIVES)
    denoiser: str = "unet"
    forward: Callable = forward
    openclip_encoders: tuple[str, ...] = ()    # A1111 runs these as OpenCLIP, not transformers
    projection_encoders: tuple[str, ...] = ()  # ComfyUI also patches their text_projection
    runs: RunKind = DIFFUSION

    def claims_base(self, base: str) -> bool:
        """Diffusion bases are recognised from their files once resolved (`recognizes`)."""
        return False

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    @property
    def trainable(self) -> tuple[str, ...]:
        """Components that can carry a LoRA, as named in checkpoints and exports."""
        return ("unet", *self.text_encoders)

    def config_alias(self, prediction: str) -> str:
        return self.configs_from.get(prediction) or self.configs_from["auto"]

    def geometry(self, vae_config, denoiser_config, where: str = "the model") -> Geometry:
        return vae_geometry(vae_config, denoiser_config, where)

    def objective(self, prediction_type: str):
        if prediction_type not in self.objectives:
            raise LoraError(f"the model's scheduler predicts {prediction_type!r}, which {self.name} "
                            "training does not support",
                            "set model.prediction_type to " + " or ".join(self.objectives))
        return self.objectives[prediction_type]

    def modelspec(self, prediction_type: str) -> tuple[str, str]:
        arch = self.modelspec_architectures.get(prediction_type) or \
            self.modelspec_architectures["epsilon"]
        return arch, self.modelspec_implementation


def _is_sdxl(c: Configs) -> bool:
    return "text_encoder_2" in c.index or \
        c.component("unet").get("addition_embed_type") == "text_time"


def _is_sd2(c: Configs) -> bool:
    # SD2 uses OpenCLIP-H (gelu) with linear projections in its transformer blocks.
    return bool(c.component("unet").get("use_linear_projection")) or \
        c.component("text_encoder").get("hidden_act") == "gelu"


def _is_sd1(c: Configs) -> bool:
    return "unet" in c.index and "text_encoder" in c.index


def _keys_start(*prefixes: str) -> Callable[[list], bool]:
    return lambda keys: any(k.startswith(prefixes) for k in keys)


SD1 = StableDiffusion(
    name="sd1", text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    pipeline="StableDiffusionPipeline", encode=encode_single, conditioning=conditioning_single,
    recognizes=_is_sd1, recognizes_checkpoint=_keys_start("model.diffusion_model."),
    configs_from={"auto": "sd15"},
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
    base_version="sd_v1", modelspec_prefix="stable-diffusion-v1",
    modelspec_architectures={"epsilon": "stable-diffusion-v1"}, context_width=768)

SD2 = StableDiffusion(
    name="sd2", text_encoders=("text_encoder",), tokenizers=("tokenizer",),
    pipeline="StableDiffusionPipeline", encode=encode_single, conditioning=conditioning_single,
    recognizes=_is_sd2, recognizes_checkpoint=_keys_start("cond_stage_model.model."),
    configs_from={"auto": "sd21", "epsilon": "sd21-base"},
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te"},
    base_version="sd_v2", modelspec_prefix="stable-diffusion-v2",
    modelspec_architectures={"epsilon": "stable-diffusion-v2-512",
                             "v_prediction": "stable-diffusion-v2-768-v"},
    ss_v2=True, context_width=1024, openclip_encoders=("text_encoder",))

SDXL = StableDiffusion(
    name="sdxl", text_encoders=("text_encoder", "text_encoder_2"),
    tokenizers=("tokenizer", "tokenizer_2"), pipeline="StableDiffusionXLPipeline",
    encode=encode_dual, conditioning=conditioning_dual,
    recognizes=_is_sdxl, recognizes_checkpoint=_keys_start("conditioner.embedders.1"),
    configs_from={"auto": "sdxl"},
    kohya_prefixes={"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
    # kohya's convention: SDXL UNet keys use the original LDM module names
    kohya_unet_layout="ldm", base_version="sdxl_base_v1-0", modelspec_prefix="stable-diffusion-xl",
    modelspec_architectures={"epsilon": "stable-diffusion-xl-v1-base"},
    modelspec_implementation="https://github.com/Stability-AI/generative-models",
    context_width=2048, openclip_encoders=("text_encoder_2",),
    projection_encoders=("text_encoder_2",))

FAMILIES = (SD1, SD2, SDXL)  # most general first: detection asks the most specific first
