"""FLUX.1 [dev] and [schnell]: CLIP-L pooled + T5 sequence, 2x2-packed 16-channel latents.

Conditioning as diffusers' `FluxPipeline` encodes it: CLIP-L's pooled output (77 tokens) and
T5's last hidden state (512 tokens for dev, 256 for schnell, as the pipelines and diffusers'
`train_dreambooth_lora_flux.py` use). The transformer sees latents packed into 2x2 patches
(64 channels), image ids (row, column) and text ids (zeros), the timestep as σ = t / 1000, and
for dev the guidance embedding (3.5, as diffusers' and kohya's FLUX trainers use).

Versions as kohya sd-scripts writes them (library/flux_utils.py `MODEL_VERSION_FLUX_V1`,
library/sai_model_spec.py `ARCH_FLUX_1_DEV`/`_SCHNELL`, `IMPL_FLUX`; sd-scripts 48d368fa).
"""

from __future__ import annotations

from functools import partial

from loracli.families.dit import Transformer, strip_prefix, tokens, transformer_class
from loracli.families.objectives import FlowMatching

GUIDANCE = 3.5
BFL = "https://github.com/black-forest-labs/flux"
# diffusers' train_dreambooth_lora_flux.py default LoRA layers: attention and MLP projections of
# both streams (single blocks: their attention; `proj_out` would also catch the final layer)
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def encode(encoders, tokenizers, captions, device, t5_length: int) -> dict:
    """CLIP-L pooled output and T5's last hidden state, as FluxPipeline.encode_prompt makes them."""
    (clip, t5), (clip_tokenizer, t5_tokenizer) = encoders, tokenizers
    ids = tokens(clip_tokenizer, captions, clip_tokenizer.model_max_length).to(device)
    pooled = clip(ids, output_hidden_states=False).pooler_output
    ids = tokens(t5_tokenizer, captions, min(t5_length, t5_tokenizer.model_max_length)).to(device)
    return {"hidden": t5(ids, output_hidden_states=False)[0], "pooled": pooled}


def conditioning(text: dict, sizes: dict) -> dict:
    return {"encoder_hidden_states": text["hidden"], "pooled_projections": text["pooled"]}


def pack(latents):
    """(B, C, H, W) → (B, H/2 · W/2, 4C): FLUX's 2x2 patches as tokens, as
    FluxPipeline._pack_latents makes them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens_, height: int, width: int):
    """The inverse of `pack` for a latent of height × width."""
    b, _, d = tokens_.shape
    c = d // 4
    x = tokens_.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype):
    """(row, column) of each packed token in channels 1 and 2; channel 0 is zero."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


def forward(denoiser, noisy, timesteps, cond, guidance: float | None):
    """The transformer's prediction for `noisy` (B, 16, H, W), unpacked to the latent's shape."""
    import torch

    b, _, h, w = noisy.shape
    text = cond["encoder_hidden_states"]
    g = None if guidance is None else torch.full((b,), guidance, device=noisy.device,
                                                  dtype=noisy.dtype)
    out = denoiser(hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype) / 1000,
                   guidance=g, pooled_projections=cond["pooled_projections"].to(noisy.dtype),
                   encoder_hidden_states=text.to(noisy.dtype),
                   txt_ids=torch.zeros(text.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                   img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False)[0]
    return unpack(out, h, w)


def _is_flux(c, guidance: bool) -> bool:
    return transformer_class(c) == "FluxTransformer2DModel" and \
        bool(c.component("transformer").get("guidance_embeds")) == guidance


def _is_flux_file(keys, guidance: bool) -> bool:
    names = strip_prefix(keys)
    return "double_blocks.0.img_attn.qkv.weight" in names and \
        ("guidance_in.in_layer.weight" in names) == guidance


# diffusers' FLUX single-file converter (loaders/single_file_utils.py
# `convert_flux_transformer_checkpoint_to_diffusers`, diffusers 0.42) splits the fused tensors at
# this hard-coded width: it loads FLUX.1's own files, and no transformer of another width
FLUX1_WIDTH = 3072


def check_single_file(path) -> None:
    """A BFL-layout FLUX file that diffusers' converter cannot split is refused before a run."""
    from safetensors import safe_open

    from loracli.errors import LoraError

    with safe_open(str(path), framework="pt") as f:
        key = next((k for k in f.keys() if k.endswith("double_blocks.0.img_attn.qkv.weight")),
                   None)
        width = int(f.get_slice(key).get_shape()[1]) if key else FLUX1_WIDTH
    if width != FLUX1_WIDTH:
        raise LoraError(f"{path}: a FLUX single-file checkpoint whose transformer is {width} "
                        f"wide; diffusers' single-file loader, which lora uses, only splits "
                        f"FLUX.1's own width ({FLUX1_WIDTH})",
                        "set model.base to this model as a diffusers folder (model_index.json "
                        "with transformer/, vae/, text_encoder/ …), e.g. one written by "
                        "FluxPipeline.save_pretrained")


def _flux(name: str, guidance: float | None, t5_length: int, alias: str, arch: str):
    has = guidance is not None
    return Transformer(
        name=name, text_encoders=("text_encoder", "text_encoder_2"),
        tokenizers=("tokenizer", "tokenizer_2"), lora_text_encoders=("text_encoder",),
        pipeline="FluxPipeline", encode=partial(encode, t5_length=t5_length),
        conditioning=conditioning, forward=partial(forward, guidance=guidance),
        recognizes=partial(_is_flux, guidance=has),
        recognizes_checkpoint=partial(_is_flux_file, guidance=has), alias=alias,
        # sd-scripts networks/lora_flux.py: LORA_PREFIX_FLUX, LORA_PREFIX_TEXT_ENCODER_CLIP
        kohya_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1"},
        kohya_unet_layout="flux", base_version="flux1", modelspec_prefix=arch,
        modelspec_implementation=BFL, unet_targets=TARGETS,
        flow=FlowMatching(density="uniform"), packed=True, check_single_file=check_single_file)


FLUX_DEV = _flux("flux-dev", GUIDANCE, 512, "flux-dev", "flux-1-dev")
FLUX_SCHNELL = _flux("flux-schnell", None, 256, "flux-schnell", "flux-1-schnell")
FAMILIES = (FLUX_DEV, FLUX_SCHNELL)
