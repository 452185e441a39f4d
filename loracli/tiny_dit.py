"""Tiny FLUX.1 and SD3.5 pipelines, built offline and deterministically from configs.

The real architectures at toy sizes: a `FluxTransformer2DModel` (1 double + 1 single block) or
an `SD3Transformer2DModel` (2 joint blocks, RMS qk-norm as SD3.5), a 16-channel AutoencoderKL
that downsamples 8x and carries the real models' `scaling_factor`/`shift_factor`, tiny CLIP
encoders with the real CLIP tokenizer (`loracli.tiny.write_clip_tokenizer`), and a tiny T5 whose
Unigram tokenizer is trained here with `tokenizers` on a fixed corpus. `save_pretrained` gives
the diffusers folders that `FluxPipeline` / `StableDiffusion3Pipeline.from_pretrained` load.
"""

from __future__ import annotations

import json
from pathlib import Path

from loracli import tiny

# The real models' VAE latent scale and shift (FLUX.1-dev/schnell and SD3.5 vae/config.json).
VAE_FACTORS = {"flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}
# Real schedulers (scheduler/scheduler_config.json of FLUX.1-dev, FLUX.1-schnell, SD3.5).
SCHEDULERS = {
    "flux-dev": {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096,
                 "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
                 "use_dynamic_shifting": True},
    "flux-schnell": {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False},
    "sd3": {"num_train_timesteps": 1000, "shift": 3.0},
}
# what each tiny pipeline is built like: FLUX with or without the guidance embedding, or SD3.5
SPECS = {"flux-dev": {"flux": True, "guidance": True},
         "flux-schnell": {"flux": True, "guidance": False},
         "sd3": {"flux": False, "guidance": False}}
KINDS = tuple(SPECS)
T5_MAX_LENGTH = 32  # the tiny tokenizer's model_max_length (real T5: 512)
_WORDS = ("a photo of the cat dog red green blue yellow purple orange white black disc square "
          "triangle on background in with style painting drawing portrait landscape sky sea "
          "tree house person woman man face small large bright dark light shadow")


def _t5_corpus() -> list[str]:
    words = _WORDS.split()
    return [" ".join(words[i:i + 6]) for i in range(len(words))] * 4


def write_t5_tokenizer(dest: Path, extra_ids: int = 8) -> Path:
    """A T5 tokenizer (Unigram, `<pad>`=0, `</s>`=1, `<unk>`=2, extra ids) trained in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>", show_progress=False)
    tok.train_from_iterator(_t5_corpus(), trainer)
    trained = json.loads(tok.to_str())["model"]["vocab"]
    # the trainer's scores differ in the last bits between runs (it works in parallel): round
    # them and order ties by piece, so the same corpus always gives the same file
    specials, pieces = trained[:3], sorted(((p, round(s, 6)) for p, s in trained[3:]),
                                           key=lambda ps: (-ps[1], ps[0]))
    vocab = [tuple(v) for v in specials] + pieces
    t5 = T5Tokenizer(vocab=vocab, extra_ids=extra_ids, model_max_length=T5_MAX_LENGTH)
    t5.save_pretrained(str(dest))
    return Path(dest)


def _t5(vocab: int, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab, d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _vae(kind: str):
    """tiny's hand-set block-average VAE with 16 channels, carrying the real scale and shift."""
    scaling, shift = VAE_FACTORS["flux" if SPECS[kind]["flux"] else "sd3"]
    vae = tiny._vae(8, 16)
    vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    return vae


def _save(pipe, dest: Path) -> None:
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        pipe.save_pretrained(dest, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def build_tiny_dit(dest: Path, kind: str = "flux-dev", seed: int = 0) -> Path:
    """Write a tiny diffusers pipeline folder: `flux-dev` (guidance embedding), `flux-schnell`
    (none) or `sd3` (SD3.5-shaped: three text encoders, RMS qk-norm). Same seed, same bytes."""
    import shutil

    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)
    from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer,
                              T5TokenizerFast)

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    dest = Path(dest)
    build = dest / ".tokenizer-build"
    clip_tokenizer = CLIPTokenizer.from_pretrained(tiny.write_clip_tokenizer(build / "clip"),
                                                   model_max_length=77)
    t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(build / "t5"))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULERS[kind])
    torch.manual_seed(seed)
    vae = _vae(kind)
    if SPECS[kind]["flux"]:
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
            pooled_projection_dim=tiny.TEXT_HIDDEN, guidance_embeds=SPECS[kind]["guidance"],
            axes_dims_rope=(4, 6, 6))
        pipe = FluxPipeline(
            scheduler=scheduler, vae=vae, transformer=transformer,
            text_encoder=CLIPTextModel(tiny._text_config(hidden_act="quick_gelu")),
            tokenizer=clip_tokenizer, text_encoder_2=_t5(len(t5_tokenizer), 32),
            tokenizer_2=t5_tokenizer)
    else:
        width = 2 * tiny.TEXT_HIDDEN  # the CLIP states side by side, padded to T5's width
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=width,
            caption_projection_dim=16, pooled_projection_dim=width, pos_embed_max_size=16,
            qk_norm="rms_norm", dual_attention_layers=(0,))
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=scheduler, vae=vae,
            text_encoder=CLIPTextModelWithProjection(
                tiny._text_config(hidden_act="quick_gelu", projection_dim=tiny.TEXT_HIDDEN)),
            tokenizer=clip_tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(
                tiny._text_config(hidden_act="gelu", projection_dim=tiny.TEXT_HIDDEN)),
            tokenizer_2=clip_tokenizer, text_encoder_3=_t5(len(t5_tokenizer), width),
            tokenizer_3=t5_tokenizer)
    _save(pipe, dest)
    shutil.rmtree(build)
    return dest
