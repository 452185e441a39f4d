"""Model families behind one small interface, so the training loop never asks "is this SDXL?".

A `Family` says which text encoders and tokenizers a model has, which modules get a LoRA by
default, how captions become the UNet's conditioning (SD1/SD2: one encoder's last hidden state;
SDXL: two encoders' penultimate states concatenated, the second one's pooled embedding and the
size/crop "time ids"), and which pipeline class renders samples. A causal-LM family would add
another `Family` without touching the loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError


@dataclass(frozen=True)
class Family:
    name: str                      # "sd1" | "sd2" | "sdxl" (run.json, export metadata)
    text_encoders: tuple[str, ...]  # component folder names, in encoding order
    tokenizers: tuple[str, ...]
    unet_targets: tuple[str, ...]
    text_targets: tuple[str, ...]
    pipeline: str                  # diffusers pipeline class for samples and single files
    encode: Callable               # (encoders, tokenizers, captions, device) -> dict of tensors
    conditioning: Callable         # (text dict, size info dict) -> unet kwargs
    export_prefixes: tuple[str, ...]  # kohya key prefix per trained component, unet first

    @property
    def components(self) -> tuple[str, ...]:
        return ("unet", "vae", *self.text_encoders, *self.tokenizers, "scheduler")


def _tokenize(tokenizer, captions):
    return tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _encode_single(encoders, tokenizers, captions, device) -> dict:
    (encoder,), (tokenizer,) = encoders, tokenizers
    ids = _tokenize(tokenizer, captions).to(device)
    return {"hidden": encoder(ids)[0]}


def _conditioning_single(text: dict, sizes: dict) -> dict:
    return {"encoder_hidden_states": text["hidden"]}


def _encode_dual(encoders, tokenizers, captions, device) -> dict:
    """SDXL: penultimate hidden states of both encoders side by side, pooled from the second."""
    import torch

    states, pooled = [], None
    for encoder, tokenizer in zip(encoders, tokenizers):
        ids = _tokenize(tokenizer, captions).to(device)
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0]  # text_embeds of CLIPTextModelWithProjection (the last encoder)
    return {"hidden": torch.cat(states, dim=-1), "pooled": pooled}


def _conditioning_dual(text: dict, sizes: dict) -> dict:
    """SDXL micro-conditioning: (original h, w, crop top, left, target h, w) per image."""
    import torch

    time_ids = torch.cat([sizes["original_size"], sizes["crop_top_left"], sizes["target_size"]],
                         dim=1).to(text["hidden"].device, text["hidden"].dtype)
    return {"encoder_hidden_states": text["hidden"],
            "added_cond_kwargs": {"text_embeds": text["pooled"], "time_ids": time_ids}}


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", ("text_encoder",), ("tokenizer",), ATTENTION, CLIP_ATTENTION,
                  "StableDiffusionPipeline", _encode_single, _conditioning_single,
                  ("lora_unet", "lora_te")),
    "sd2": Family("sd2", ("text_encoder",), ("tokenizer",), ATTENTION, CLIP_ATTENTION,
                  "StableDiffusionPipeline", _encode_single, _conditioning_single,
                  ("lora_unet", "lora_te")),
    "sdxl": Family("sdxl", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
                   ATTENTION, CLIP_ATTENTION, "StableDiffusionXLPipeline", _encode_dual,
                   _conditioning_dual, ("lora_unet", "lora_te1", "lora_te2")),
}


def get(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise LoraError(f"unknown model family {name!r}",
                        "set model.family to auto, sd1, sd2 or sdxl") from None


def detect(folder: Path) -> str:
    """sd1, sd2 or sdxl from a diffusers folder's configs (no weights are read)."""
    folder = Path(folder)
    try:
        index = json.loads((folder / "model_index.json").read_text("utf-8"))
        unet = json.loads((folder / "unet" / "config.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise LoraError(f"{folder}: not a diffusers model folder ({type(e).__name__})",
                        "pass a folder with model_index.json, a .safetensors file, or an alias "
                        "such as sd15") from None
    if "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time":
        return "sdxl"
    # SD2 uses OpenCLIP-H (gelu) with linear projections in its transformer blocks.
    text = {}
    try:
        text = json.loads((folder / "text_encoder" / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        pass
    if unet.get("use_linear_projection") or text.get("hidden_act") == "gelu":
        return "sd2"
    return "sd1"


def prediction_type(folder: Path) -> str:
    try:
        path = Path(folder) / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return "epsilon"
    return config.get("prediction_type") or "epsilon"


# ---------------------------------------------------------------- base models

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
CONFIG_ALIAS = {"sd1": "sd15", "sd2": "sd21", "sdxl": "sdxl"}  # configs for single files


@dataclass(frozen=True)
class Base:
    """Where a base model is and what it is (run.json's "base")."""

    model: str                 # what the profile said
    path: Path                 # a diffusers folder or a single file
    repo: str | None
    commit: str | None
    family: str
    prediction_type: str
    config_dir: Path           # the diffusers folder whose configs describe it

    def to_dict(self) -> dict:
        return {"model": self.model, "path": str(self.path), "repo": self.repo,
                "commit": self.commit, "family": self.family,
                "prediction_type": self.prediction_type, "config_dir": str(self.config_dir)}

    @classmethod
    def from_dict(cls, d: dict) -> "Base":
        return cls(d["model"], Path(d["path"]), d.get("repo"), d.get("commit"), d["family"],
                   d["prediction_type"], Path(d.get("config_dir") or d["path"]))


def _single_file_family(path: Path) -> str:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return "sd1"
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    return "sd1"


def resolve_base(model: str, family: str = "auto", prediction: str = "auto") -> Base:
    """A profile's model.base → a local folder or file (never the network).

    A missing model raises `LoraError` whose hint is the `lora fetch` command.
    """
    from loracli import models

    as_path = Path(model).expanduser()
    repo = commit = None
    looks_like_path = as_path.exists() or model.startswith((".", "/", "~")) \
        or as_path.suffix.lower() in SINGLE_FILE_SUFFIXES
    if looks_like_path:
        if not as_path.exists():
            raise LoraError(f"{model}: no such model file or folder",
                            "check model.base in the profile, or use an alias: `lora fetch sd15`")
        path = as_path.resolve()
    else:
        ref = models.resolve(model)
        path = models.local_snapshot(model)
        repo, commit = ref.repo_id, path.name if len(path.name) == 40 else None
    if path.is_file():
        fam = family if family != "auto" else _single_file_family(path)
        alias = CONFIG_ALIAS[fam]
        if fam == "sd2" and prediction == "epsilon":
            alias = "sd21-base"
        try:
            config_dir = models.local_snapshot(alias)
        except LoraError as e:
            raise LoraError(f"{path.name} is a single-file checkpoint; its configs come from "
                            f"{alias}, which is not in the model cache",
                            f"lora fetch {alias}") from e
    else:
        config_dir = path
        fam = family if family != "auto" else detect(path)
    pred = prediction if prediction != "auto" else prediction_type(config_dir)
    return Base(model, path, repo, commit, fam, pred, config_dir)


def load_components(base: Base, family: Family, vae: str = "") -> dict:
    """The base model's parts by component name, on the CPU, fp32, offline."""
    import importlib

    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    names = ("unet", "vae", *family.text_encoders, *family.tokenizers, "scheduler")
    if base.path.is_file():
        import diffusers

        pipe = getattr(diffusers, family.pipeline).from_single_file(
            str(base.path), config=str(base.config_dir), local_files_only=True)
        parts = {n: getattr(pipe, n) for n in names}
    else:
        index = json.loads((base.path / "model_index.json").read_text("utf-8"))
        parts = {}
        for name in names:
            if name not in index or index[name][0] is None:
                raise LoraError(f"{base.path}: has no {name} (model_index.json)",
                                f"is it really an {family.name} model? set model.family")
            library, cls = index[name]
            loader = getattr(importlib.import_module(library), cls)
            parts[name] = loader.from_pretrained(base.path, subfolder=name, local_files_only=True)
    if vae:
        parts["vae"] = _load_vae(vae)
    return parts


def _load_vae(vae: str):
    from diffusers import AutoencoderKL

    from loracli import models

    path = Path(vae).expanduser()
    if not path.exists():
        path = models.local_snapshot(vae)
    if path.is_file():
        return AutoencoderKL.from_single_file(str(path), local_files_only=True)
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True)
