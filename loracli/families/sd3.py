"""Stable Diffusion 3.5 (medium, large): MMDiT with CLIP-L + CLIP-G + T5 conditioning.

Conditioning as diffusers' `StableDiffusion3Pipeline` encodes it: both CLIP encoders'
penultimate hidden states side by side, zero-padded to T5's width and followed by T5's last
hidden state along the sequence (77 T5 tokens, the default of diffusers'
`train_dreambooth_lora_sd3.py`); the pooled projections of both CLIPs side by side. Timesteps
are drawn logit-normal (that script's default `weighting_scheme`) over the scheduler's
shifted sigmas (shift 3.0 in SD3.5's scheduler config).

Versions as kohya sd-scripts writes them (sd-scripts 48d368fa): `ss_base_model_version` is the
MMDiT's model type (library/sd3_utils.py: "5-large", "5-medium"), modelspec architecture
`stable-diffusion-3-` + that type (library/sai_model_spec.py `ARCH_SD3_M`), implementation
"diffusers" (`IMPL_DIFFUSERS`, what it writes for an SD3 LoRA).
"""

from __future__ import annotations

from functools import partial

from loracli.families.dit import Transformer, strip_prefix, tokens, transformer_class
from loracli.families.objectives import FlowMatching

T5_LENGTH = 77
# diffusers' train_dreambooth_lora_sd3.py default LoRA layers (joint attention, both streams),
# the MLPs of both streams, and SD3.5 medium's second (image-only) attention
TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
           "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
           "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def encode(encoders, tokenizers, captions, device) -> dict:
    """SD3's prompt embeddings (CLIP-L|CLIP-G padded, then T5) and pooled projections."""
    import torch
    import torch.nn.functional as F

    states, pooled = [], []
    for encoder, tokenizer in zip(encoders[:2], tokenizers[:2]):
        ids = tokens(tokenizer, captions, tokenizer.model_max_length).to(device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out[0])
    t5, t5_tokenizer = encoders[2], tokenizers[2]
    ids = tokens(t5_tokenizer, captions, min(T5_LENGTH, t5_tokenizer.model_max_length)).to(device)
    t5_states = t5(ids)[0]
    clip = torch.cat(states, dim=-1)
    clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    return {"hidden": torch.cat([clip, t5_states], dim=-2), "pooled": torch.cat(pooled, dim=-1)}


def conditioning(text: dict, sizes: dict) -> dict:
    return {"encoder_hidden_states": text["hidden"], "pooled_projections": text["pooled"]}


def forward(denoiser, noisy, timesteps, cond):
    return denoiser(hidden_states=noisy, timestep=timesteps.to(noisy.dtype),
                    encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
                    pooled_projections=cond["pooled_projections"].to(noisy.dtype),
                    return_dict=False)[0]


def _is_sd35(c, medium: bool) -> bool:
    config = c.component("transformer")
    return transformer_class(c) == "SD3Transformer2DModel" and bool(config.get("qk_norm")) and \
        bool(config.get("dual_attention_layers")) == medium


def _is_sd35_file(keys, medium: bool) -> bool:
    # sd-scripts library/sd3_utils.py: RMS qk-norm → 3.5; a second x-block attention → medium
    names = strip_prefix(keys)
    return "joint_blocks.0.context_block.attn.ln_k.weight" in names and \
        any(".x_block.attn2." in k for k in names) == medium


def _sd35(name: str, medium: bool, model_type: str):
    return Transformer(
        name=name, text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3"),
        tokenizers=("tokenizer", "tokenizer_2", "tokenizer_3"),
        lora_text_encoders=("text_encoder", "text_encoder_2"),
        pipeline="StableDiffusion3Pipeline", encode=encode, conditioning=conditioning,
        forward=forward, recognizes=partial(_is_sd35, medium=medium),
        recognizes_checkpoint=partial(_is_sd35_file, medium=medium), alias=name,
        # sd-scripts networks/lora_sd3.py: LORA_PREFIX_SD3, _TEXT_ENCODER_CLIP_L, _CLIP_G
        kohya_prefixes={"transformer": "lora_unet", "text_encoder": "lora_te1",
                        "text_encoder_2": "lora_te2"},
        kohya_unet_layout="mmdit", base_version=model_type,
        modelspec_prefix=f"stable-diffusion-3-{model_type}", modelspec_implementation="diffusers",
        unet_targets=TARGETS, flow=FlowMatching(density="logit_normal"), packed=False)


SD35_MEDIUM = _sd35("sd35-medium", True, "5-medium")
SD35_LARGE = _sd35("sd35-large", False, "5-large")
FAMILIES = (SD35_MEDIUM, SD35_LARGE)
