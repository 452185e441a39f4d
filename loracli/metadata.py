"""What an exported LoRA says about itself: the safetensors header keys that WebUI (`ss_*`),
model sites (Stability ModelSpec) and `lora inspect` read, and the file hash A1111 shows.

All values are strings, as the safetensors format requires.
"""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime
from typing import TYPE_CHECKING

from loracli import __version__, families

if TYPE_CHECKING:
    from loracli.export import Run


def metadata(r: "Run", name: str, modules: list, dtype: str, kohya: bool = True) -> dict[str, str]:
    """The header keys WebUI, model sites and `lora inspect` read (every value a string)."""
    profile, data = r.profile, r.dataset
    lora, train = profile.get("lora", {}), profile.get("train", {})
    base = r.info.get("base", {})
    ranks = Counter(m.rank for m in modules)
    alphas = Counter(m.alpha for m in modules)
    resolution = data.get("resolution") or profile.get("data", {}).get("resolution") or 512
    trigger = profile.get("data", {}).get("trigger", "")
    started = r.info.get("started_at", "")
    v_pred = base.get("prediction_type") == "v_prediction"
    family = families.get(r.family)
    architecture, implementation = family.modelspec(base.get("prediction_type") or "epsilon")
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture + "/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.date": started[:10] if started else "",
        "loracli.version": __version__,
        "loracli.base_model": str(base.get("model") or ""),
        "loracli.base_repo": str(base.get("repo") or ""),
        "loracli.base_commit": str(base.get("commit") or ""),
        "loracli.family": r.family,
        "loracli.step": str(r.step),
        "loracli.dtype": dtype,
        "loracli.trigger_words": json.dumps([trigger] if trigger else []),
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if not kohya:
        return {k: v for k, v in meta.items() if v != ""}
    conv = [m for m in modules if m.down.dim() == 4]
    args = {"conv_dim": str(conv[0].rank), "conv_alpha": str(conv[0].alpha)} if conv else {}
    if lora.get("rslora"):
        args["rslora"] = "True"
    meta.update({
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(lora.get("dropout", "")),
        "ss_base_model_version": family.base_version,
        "ss_v2": str(family.ss_v2),
        "ss_v_parameterization": str(v_pred),
        "ss_sd_model_name": str(base.get("repo") or base.get("model") or ""),
        "ss_output_name": name,
        "ss_tag_frequency": json.dumps(data.get("tag_frequency", {}), ensure_ascii=False),
        "ss_num_train_images": str(data.get("num_images", "")),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(r.step),
        "ss_max_train_steps": str(train.get("max_steps", "")),
        "ss_epoch": str(r.epoch if r.epoch is not None else ""),
        "ss_learning_rate": str(train.get("learning_rate", "")),
        "ss_unet_lr": str(train.get("learning_rate", "")),
        "ss_text_encoder_lr": str(train.get("text_encoder_lr") or train.get("learning_rate", "")),
        "ss_lr_scheduler": str(train.get("scheduler", "")),
        "ss_optimizer": str(train.get("optimizer", "")),
        "ss_batch_size_per_device": str(train.get("batch_size", "")),
        "ss_gradient_accumulation_steps": str(train.get("gradient_accumulation", "")),
        "ss_mixed_precision": str(train.get("mixed_precision", "")),
        "ss_seed": str(train.get("seed", "")),
        "ss_noise_offset": str(train.get("noise_offset", "")),
        "ss_min_snr_gamma": str(train.get("min_snr_gamma", "")),
        "ss_clip_skip": "None",
        "ss_caption_dropout_rate": str(profile.get("data", {}).get("caption_dropout", "")),
        "ss_shuffle_caption": str(profile.get("data", {}).get("shuffle_captions", "")),
        "ss_keep_tokens": str(profile.get("data", {}).get("keep_tokens", "")),
        "ss_training_started_at": _epoch(started),
        "ss_training_comment": f"trained with lora {r.info.get('lora_version', __version__)}"
                               + (f"; trigger: {trigger}" if trigger else ""),
    })
    return {k: v for k, v in meta.items() if v != ""}


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _epoch(iso: str) -> str:
    try:
        return str(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return ""


def serialize(tensors: dict, header: dict) -> bytes:
    """safetensors bytes with `sshs_model_hash`/`modelspec.hash_sha256` (sha256 after the header)."""
    import hashlib

    from safetensors.torch import save

    data = save(tensors, metadata=header)
    size = int.from_bytes(data[:8], "little")
    digest = hashlib.sha256(data[8 + size:]).hexdigest()
    return save(tensors, metadata={**header, "sshs_model_hash": digest,
                                   "modelspec.hash_sha256": "0x" + digest})


def same_safetensors(a: bytes, b: bytes) -> bool:
    """Equal tensors and header; the header's key order is not stable between writes."""
    try:
        na, nb = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
        return a[8 + na:] == b[8 + nb:] and json.loads(a[8:8 + na]) == json.loads(b[8:8 + nb])
    except ValueError:
        return False
