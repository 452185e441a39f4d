"""Tiny Stable Diffusion and open_clip models, built offline and deterministically from configs.

They have the real architectures (so every loader, converter and trainer path runs for real) at
sizes that train in seconds on a CPU. They back `lora fetch tiny-sd`, `lora demo` and the tests;
no weights are ever downloaded. The one exception to "random": `tiny-sd`'s UNet ships 1.6 MB of
weights (`weights/tiny-sd-unet.safetensors`, made by `pretrain_unet`, `python -m loracli.tiny`),
so that the demo's base can draw and a LoRA on it visibly learns.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

# What each tiny pipeline is built like: two text encoders + size conditioning (XL), linear
# projections + gelu CLIP + v-prediction (SD2), or neither (SD1).
SPECS = {
    "sd1": {"xl": False, "v2": False, "pretrained": True},
    "sd2": {"xl": False, "v2": True, "pretrained": False},
    "sdxl": {"xl": True, "v2": False, "pretrained": False},
}
FAMILIES = tuple(SPECS)
UNET_WEIGHTS = "weights/tiny-sd-unet.safetensors"  # packaged: the pretrained tiny SD1 UNet
BUILD_VERSION = 2  # raise when build_tiny_sd changes what it writes: caches then rebuild tiny-sd
BUILD_FILE = "lora_tiny_build.txt"
TEXT_HIDDEN = 32
OPEN_CLIP_TINY = {
    "embed_dim": 32,
    "quick_gelu": False,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_id() -> str:
    """Identifies what `build_tiny_sd(pretrained_unet=True)` writes with this version of lora."""
    import hashlib

    weights = (Path(__file__).parent / UNET_WEIGHTS).read_bytes()
    return f"{BUILD_VERSION}-{hashlib.sha256(weights).hexdigest()[:16]}"


def bpe_vocab_path() -> Path:
    """open_clip's bundled CLIP BPE file, located without importing open_clip (a 6 s import)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable-unicode table (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def write_clip_tokenizer(dest: Path) -> Path:
    """Write a real 49,408-token CLIP tokenizer (vocab.json, merges.txt) from open_clip's BPE file."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(bpe_vocab_path()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dest / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), "utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (dest / "special_tokens_map.json").write_text(json.dumps(special), "utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, **special}
    (dest / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    return dest


def _text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        hidden_size=TEXT_HIDDEN, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=49407, **extra,
    )


VAE_K = 10.0  # the constant channels that keep GroupNorm from erasing colour (see _vae)


def _vae(downsample: int = 8, channels: int = 4):
    """A tiny AutoencoderKL whose weights are set by hand, not random: the encoder averages each
    `downsample`² pixel block into a latent pixel (RGB, then luminance in every further
    channel), the decoder repeats it back. So latents carry the picture's colours and layout,
    and generated samples are readable mosaics instead of noise.

    Residual branches are zeroed (every ResNet block and attention is an identity). The final
    GroupNorms would remove each channel's mean; each group instead holds (v, -v, K, -K), whose
    mean is 0 and whose spread is ~K/sqrt(2) whatever v is, so v passes through scaled by a
    near-constant, and SiLU(a) - SiLU(-a) = a undoes the activation in the next convolution.
    """
    import math

    import torch
    from diffusers import AutoencoderKL

    k = VAE_K
    gain = k / math.sqrt(2.0)
    blocks = downsample.bit_length()  # 2 ** (blocks - 1) == downsample
    if downsample < 1 or 2 ** (blocks - 1) != downsample:
        raise ValueError(f"downsample must be a power of two, not {downsample}")
    width = 4 * channels  # four internal channels (v, -v, K, -K) per latent channel
    vae = AutoencoderKL(
        block_out_channels=(width,) * blocks, layers_per_block=1, latent_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        norm_num_groups=channels, sample_size=64, scaling_factor=gain,
    )
    enc, dec = vae.encoder, vae.decoder
    with torch.no_grad():
        for p in vae.parameters():
            p.zero_()
        for norm in (enc.conv_norm_out, dec.conv_norm_out):
            norm.weight.fill_(1.0)
        for c in range(channels):
            src = [c] if c < 3 else [0, 1, 2]
            for s in src:
                enc.conv_in.weight[4 * c, s, 1, 1] = 1.0 / len(src)
                enc.conv_in.weight[4 * c + 1, s, 1, 1] = -1.0 / len(src)
            enc.conv_out.weight[c, 4 * c, 1, 1] = 1.0
            enc.conv_out.weight[c, 4 * c + 1, 1, 1] = -1.0
            dec.conv_in.weight[4 * c, c, 1, 1] = gain
            dec.conv_in.weight[4 * c + 1, c, 1, 1] = -gain
            for conv_in in (enc.conv_in, dec.conv_in):
                conv_in.bias[4 * c + 2] = k
                conv_in.bias[4 * c + 3] = -k
            if c < 3:
                dec.conv_out.weight[c, 4 * c, 1, 1] = gain
                dec.conv_out.weight[c, 4 * c + 1, 1, 1] = -gain
        enc.conv_out.bias[channels:] = -20.0  # log-variance: a near-deterministic latent
        eye = torch.eye(width)
        for block in enc.down_blocks:
            for down in block.downsamplers or []:
                down.conv.weight[:, :, 0:2, 0:2] = 0.25 * eye[:, :, None, None]
        for block in dec.up_blocks:
            for up in block.upsamplers or []:
                up.conv.weight[:, :, 1, 1] = eye
        vae.quant_conv.weight[:, :, 0, 0] = torch.eye(2 * channels)
        vae.post_quant_conv.weight[:, :, 0, 0] = torch.eye(channels)
    return vae


def build_tiny_sd(dest: Path, family: str = "sd1", seed: int = 0,
                  pretrained_unet: bool = False, vae_downsample: int = 8,
                  latent_channels: int = 4) -> Path:
    """Write a tiny diffusers pipeline folder of `family` (sd1, sd2 with v-prediction, sdxl).

    The VAE downsamples 8x like the real ones, so a 64 px image gives the UNet's 8x8 latents;
    it is a fixed block-average encoder/decoder (`_vae`), the text encoders are random. The UNet
    is random too, unless `pretrained_unet` (sd1 only): then it carries the packaged weights of
    `pretrain_unet`, and the pipeline draws coloured shapes instead of noise.
    `vae_downsample` (a power of two) and `latent_channels` build the other latent geometries
    diffusers allows (a 2x VAE; 16 channels as FLUX and SD3 use), with a UNet that fits them.
    """
    import torch
    from diffusers import (DDPMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline, UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    if family not in SPECS:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
    spec = SPECS[family]
    latent = {"in_channels": latent_channels, "out_channels": latent_channels,
              "sample_size": 64 // vae_downsample}
    vae = _vae(vae_downsample, latent_channels)
    dest = Path(dest)
    tok_dir = write_clip_tokenizer(dest / ".tokenizer-build")
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                 num_train_timesteps=1000)
    torch.manual_seed(seed)
    if spec["xl"]:
        unet = UNet2DConditionModel(
            block_out_channels=(16, 32, 32), layers_per_block=2, **latent,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 4),
            use_linear_projection=True, cross_attention_dim=2 * TEXT_HIDDEN, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=8 * 6 + TEXT_HIDDEN,
        )
        text_encoder = CLIPTextModel(_text_config(hidden_act="quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(
            _text_config(hidden_act="gelu", projection_dim=TEXT_HIDDEN))
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
            tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
            scheduler=EulerDiscreteScheduler(**betas, timestep_spacing="leading", steps_offset=1),
        )
    else:
        v2 = spec["v2"]
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, **latent,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_HIDDEN, attention_head_dim=4, norm_num_groups=8,
            use_linear_projection=v2,
        )
        text_encoder = CLIPTextModel(_text_config(hidden_act="gelu" if v2 else "quick_gelu"))
        scheduler = DDPMScheduler(**betas, clip_sample=False, steps_offset=1,
                                  prediction_type="v_prediction" if v2 else "epsilon")
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    if pretrained_unet:
        if not spec["pretrained"] or (vae_downsample, latent_channels) != (8, 4):
            raise ValueError("only the sd1 tiny model with its 8x VAE has pretrained UNet weights")
        from safetensors.torch import load_file

        weights = load_file(str(Path(__file__).parent / UNET_WEIGHTS))
        pipe.unet.load_state_dict({k: v.float() for k, v in weights.items()})
    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # "Writing model shards" is noise in `lora demo`
    try:
        pipe.save_pretrained(dest, safe_serialization=True)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    return dest


def build_tiny_open_clip(dest: Path, seed: int = 0) -> Path:
    """Write a tiny open_clip model as a `local-dir:` folder (config + safetensors weights)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**OPEN_CLIP_TINY)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(dest / "open_clip_model.safetensors"))
    preprocess = {"mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711],
                  "interpolation": "bicubic", "resize_mode": "shortest"}
    (dest / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": OPEN_CLIP_TINY, "preprocess_cfg": preprocess}, indent=2), "utf-8")
    return dest


# ---------------------------------------------------------------- the packaged UNet weights

SHAPE_COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220),
                 "yellow": (230, 210, 40), "purple": (140, 50, 180), "orange": (240, 140, 30),
                 "white": (240, 240, 240), "black": (20, 20, 20)}
SHAPES = ("square", "triangle")  # no discs: `lora demo` teaches those


def shapes_dataset(count: int, seed: int = 0) -> list:
    """(64 px image, caption) pairs: a square or triangle of one colour on another."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        bg = rng.choice(list(SHAPE_COLOURS))
        fg = rng.choice([c for c in SHAPE_COLOURS if c != bg])
        shape = rng.choice(SHAPES)
        im = Image.new("RGB", (64, 64), SHAPE_COLOURS[bg])
        r = rng.randint(10, 22)
        cx, cy = rng.randint(r, 64 - r), rng.randint(r, 64 - r)
        if shape == "square":
            ImageDraw.Draw(im).rectangle((cx - r, cy - r, cx + r, cy + r), fill=SHAPE_COLOURS[fg])
        else:
            ImageDraw.Draw(im).polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)],
                                       fill=SHAPE_COLOURS[fg])
        out.append((im, f"a {fg} {shape} on a {bg} background"))
    return out


def pretrain_unet(pipeline: Path, steps: int = 1500, seed: int = 0,
                  on_step=None) -> dict:
    """Train the tiny SD1 UNet (all of it) on `shapes_dataset`, so it can draw; fp16 weights.

    This is how `loracli/weights/tiny-sd-unet.safetensors` was made (`python -m loracli.tiny`):
    ~2 minutes on two CPU cores; a LoRA on a random UNet cannot learn to draw in a demo's minute,
    but one on this base visibly learns a new concept.
    """
    import numpy as np
    import torch
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    images, captions = zip(*shapes_dataset(1024, seed))
    with torch.no_grad():
        pixels = torch.stack([torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1)
                              .permute(2, 0, 1) for i in images])
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(list(captions), padding="max_length", max_length=77,
                             truncation=True, return_tensors="pt").input_ids
        text = torch.cat([pipe.text_encoder(ids[i:i + 128])[0] for i in range(0, len(ids), 128)])
    unet = pipe.unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        idx = torch.randint(0, len(latents), (32,), generator=g)
        eps = torch.randn(latents[idx].shape, generator=g)
        t = torch.randint(0, noise.config.num_train_timesteps, (32,), generator=g)
        pred = unet(noise.add_noise(latents[idx], eps, t), t, encoder_hidden_states=text[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if on_step:
            on_step(step, loss.item())
    return {k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}


if __name__ == "__main__":
    import tempfile

    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_sd(Path(tmp) / "sd1", "sd1")
        state = pretrain_unet(base, on_step=lambda s, l: s % 100 or print(f"step {s} loss {l:.4f}"))
    target = Path(__file__).parent / UNET_WEIGHTS
    target.parent.mkdir(exist_ok=True)
    save_file(state, str(target))
    print(f"wrote {target}")
