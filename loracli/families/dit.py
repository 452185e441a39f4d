"""What FLUX.1 and SD3.5 share: a transformer trained by flow matching on 16-channel latents.

One dataclass (`Transformer`) holds a DiT family as data plus its three small functions (encode
captions, condition the transformer, call it); `loracli.families.flux` and `.sd3` build the
instances. The trainer reaches the denoiser through the component named `denoiser`
("transformer") and `forward`, so it never knows whether it holds a UNet or a transformer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

from loracli.errors import LoraError
from loracli.families.base import DIFFUSION, Configs, Geometry, RunKind, vae_geometry
from loracli.families.objectives import FlowMatching

CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")


def tokens(tokenizer, captions, length: int):
    return tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                     return_tensors="pt").input_ids


def transformer_class(c: Configs) -> str:
    return str(c.component("transformer").get("_class_name") or "")


def strip_prefix(keys: list[str]) -> set[str]:
    """A single file's tensor names without the ComfyUI/SAI `model.diffusion_model.` prefix."""
    return {k.removeprefix("model.diffusion_model.") for k in keys}


@dataclass(frozen=True)
class Transformer:
    """A transformer + 16-channel AutoencoderKL + CLIP/T5 family trained by flow matching."""

    name: str
    text_encoders: tuple[str, ...]
    tokenizers: tuple[str, ...]
    lora_text_encoders: tuple[str, ...]   # the CLIP encoders: the anchors never train T5
    pipeline: str
    encode: Callable                       # (encoders, tokenizers, captions, device) → dict
    conditioning: Callable                 # (text, sizes) → the transformer's text kwargs
    forward: Callable                      # (denoiser, noisy, timesteps, cond) → prediction
    recognizes: Callable[[Configs], bool]
    recognizes_checkpoint: Callable[[list], bool]
    alias: str                             # the cached model whose configs a single file uses
    kohya_prefixes: Mapping[str, str]
    kohya_unet_layout: str                 # "flux" | "mmdit": see loracli.exporting.convert_dit
    base_version: str
    modelspec_prefix: str                  # the whole modelspec architecture (before "/lora")
    modelspec_implementation: str
    unet_targets: tuple[str, ...]
    flow: FlowMatching
    packed: bool                           # FLUX packs 2x2 latent patches into 64 channels
    text_targets: tuple[str, ...] = CLIP_ATTENTION
    denoiser: str = "transformer"
    ss_v2: bool = False
    context_width: int | None = None
    check_single_file: Callable | None = None  # (path) → None, or a LoraError: before a run
    openclip_encoders: tuple[str, ...] = ()
    projection_encoders: tuple[str, ...] = ()
    runs: RunKind = DIFFUSION

    def claims_base(self, base: str) -> bool:
        """Diffusion bases are recognised from their files once resolved (`recognizes`)."""
        return False

    @property
    def components(self) -> tuple[str, ...]:
        return ("transformer", "vae", *self.text_encoders, *self.tokenizers, "scheduler")

    @property
    def trainable(self) -> tuple[str, ...]:
        return ("transformer", *self.lora_text_encoders)

    def config_alias(self, prediction: str) -> str:
        return self.alias

    def geometry(self, vae_config, denoiser_config, where: str = "the model") -> Geometry:
        """16-channel latents from the VAE config; the transformer's patches set the multiple."""
        geometry = vae_geometry(vae_config, {}, where)
        patch = 2 if self.packed else int(denoiser_config.get("patch_size") or 1)
        wanted = denoiser_config.get("in_channels")
        takes = geometry.latent_channels * (4 if self.packed else 1)
        if wanted is not None and int(wanted) != takes:
            raise LoraError(f"{where}: the VAE makes {geometry.latent_channels}-channel latents "
                            f"but the {self.name} transformer takes {wanted} input channels",
                            "use the VAE made for this base model: set model.vae = \"\" or to a "
                            "VAE of the same family")
        return replace(geometry, denoiser_multiple=patch)

    def objective(self, prediction_type: str):
        if prediction_type != self.flow.name:
            raise LoraError(f"{self.name} is trained by flow matching, not {prediction_type!r}",
                            "set model.prediction_type = \"auto\"")
        return self.flow

    def modelspec(self, prediction_type: str) -> tuple[str, str]:
        return self.modelspec_prefix, self.modelspec_implementation
