"""What an exported LoRA says about itself: the safetensors header keys that WebUI and its
extensions (`ss_*`, `sshs_*`), model sites (Stability ModelSpec) and `lora inspect` read.

The `ss_*` set is what kohya sd-scripts writes for the same run (`train_network.py` and
`library/train_util.py` at kohya-ss/sd-scripts 48d368f): the values mean what they mean there
(epochs counted from 1, `None` for an option that is off, base names instead of local paths).
All values are strings, as the safetensors format requires.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from datetime import datetime

from loracli import __version__, families
from loracli.exporting import provenance
from loracli.exporting.trained import Run


def metadata(r: Run, name: str, modules: list, dtype: str, kohya: bool = True,
             keep_paths: bool = False, padded: int = 0) -> dict[str, str]:
    """The header keys WebUI, model sites and `lora inspect` read (every value a string)."""
    profile, data = r.profile, r.dataset
    base = provenance.base_identity(r.info.get("base", {}), keep_paths)
    started = r.info.get("started_at", "")
    v_pred = r.info.get("base", {}).get("prediction_type") == "v_prediction"
    resolution = data.get("resolution") or profile.get("data", {}).get("resolution") or 512
    trigger = profile.get("data", {}).get("trigger", "")
    family = families.get(r.family)
    architecture, implementation = family.modelspec(
        r.info.get("base", {}).get("prediction_type") or "epsilon")
    meta = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture + "/lora",
        "modelspec.implementation": implementation,
        "modelspec.title": name,
        "modelspec.resolution": f"{resolution}x{resolution}",
        # none for flow matching (FLUX, SD3), as sd-scripts' sai_model_spec writes them
        "modelspec.prediction_type": {"v_prediction": "v", "epsilon": "epsilon"}.get(
            r.info.get("base", {}).get("prediction_type") or "epsilon", ""),
        "modelspec.date": started[:10] if started else "",
        "loracli.version": __version__,
        "loracli.base_model": base.label,
        "loracli.base_repo": base.repo,
        "loracli.base_commit": base.commit,
        "loracli.base_path": base.path,
        "loracli.family": r.family,
        "loracli.step": str(r.step),
        "loracli.dtype": dtype,
        "loracli.trigger_words": json.dumps([trigger] if trigger else []),
        "loracli.zero_modules": str(padded) if padded else "",
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if kohya:
        meta.update(_kohya(r, name, modules, base, resolution, trigger, v_pred, keep_paths))
    return {k: v for k, v in meta.items() if v != ""}


def _kohya(r: Run, name: str, modules: list, base, resolution: int, trigger: str, v_pred: bool,
           keep_paths: bool) -> dict[str, str]:
    profile, data, state = r.profile, r.dataset, r.state
    family = families.get(r.family)
    lora, train, prof_data = profile.get("lora", {}), profile.get("train", {}), profile.get("data", {})
    ranks, alphas = Counter(m.rank for m in modules), Counter(m.alpha for m in modules)
    conv = [m for m in modules if m.down.dim() == 4]
    args = {"conv_dim": str(conv[0].rank), "conv_alpha": _num(conv[0].alpha)} if conv else {}
    if lora.get("rslora"):
        args["rslora"] = "True"
    accum = int(state.get("micro_batches", 0) // max(r.step, 1)) or train.get("gradient_accumulation", 1)
    per_epoch = state.get("batches_per_epoch")
    max_steps = state.get("max_steps") or train.get("max_steps") or r.step
    dirs = data.get("dirs") or _dirs_from_tags(data)
    repeats = int(prof_data.get("repeats", 1) or 1)
    started = r.info.get("started_at", "")
    bucketing = bool(prof_data.get("bucketing", True))
    return {
        "ss_session_id": str(_session_id(r)),
        "ss_training_started_at": _epoch(started),
        "ss_training_finished_at": repr(r.saved_at) if r.saved_at else "",
        "ss_output_name": name,
        "ss_sd_model_name": base.name,
        "ss_sd_model_hash": base.legacy_hash,
        "ss_new_sd_model_hash": base.sha256,
        **_vae(profile.get("model", {}).get("vae", ""), keep_paths),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(ranks.most_common(1)[0][0]),
        "ss_network_alpha": _num(alphas.most_common(1)[0][0]),
        "ss_network_args": json.dumps(args),
        "ss_network_dropout": str(lora.get("dropout", "")),
        "ss_base_model_version": family.base_version,
        "ss_v2": str(family.ss_v2),
        "ss_v_parameterization": str(v_pred),
        "ss_tag_frequency": json.dumps(data.get("tag_frequency", {}), ensure_ascii=False),
        "ss_dataset_dirs": json.dumps(dirs, ensure_ascii=False),
        "ss_reg_dataset_dirs": "{}",
        "ss_bucket_info": json.dumps(data["buckets"] if bucketing and data.get("buckets") else None),
        "ss_num_train_images": str(sum(d["img_count"] * d["n_repeats"] for d in dirs.values()) * repeats
                                   if dirs and all("img_count" in d for d in dirs.values())
                                   else data.get("num_images", "")),
        "ss_num_reg_images": "0",
        "ss_num_batches_per_epoch": str(per_epoch or ""),
        "ss_num_epochs": str(math.ceil(max_steps * accum / per_epoch) if per_epoch
                             else train.get("epochs") or ""),
        "ss_epoch": str(_epoch_number(r, accum)),
        "ss_steps": str(r.step),
        "ss_max_train_steps": str(max_steps),
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": str(bucketing),
        "ss_bucket_no_upscale": "True",   # buckets never upscale (loracli.training.dataset)
        "ss_flip_aug": str(bool(prof_data.get("flip", False))),
        "ss_random_crop": str(prof_data.get("crop", "center") == "random"),
        "ss_color_aug": "False",
        "ss_shuffle_caption": str(bool(prof_data.get("shuffle_captions", False))),
        "ss_keep_tokens": str(prof_data.get("keep_tokens", 0)),
        "ss_caption_dropout_rate": str(prof_data.get("caption_dropout", 0.0)),
        "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": "0.0",
        "ss_learning_rate": str(train.get("learning_rate", "")),
        "ss_unet_lr": str(train.get("learning_rate", "")),
        "ss_text_encoder_lr": str(train.get("text_encoder_lr") or train.get("learning_rate", "")),
        "ss_lr_scheduler": str(train.get("scheduler", "")),
        "ss_lr_warmup_steps": str(train.get("warmup_steps", 0)),
        "ss_optimizer": str(train.get("optimizer", "")),
        "ss_max_grad_norm": str(train.get("max_grad_norm", "")),
        "ss_batch_size_per_device": str(train.get("batch_size", "")),
        "ss_total_batch_size": str(state.get("global_batch", train.get("batch_size", 1)) * accum),
        "ss_gradient_accumulation_steps": str(accum),
        "ss_gradient_checkpointing": str(bool(train.get("gradient_checkpointing", False))),
        "ss_mixed_precision": str(train.get("mixed_precision", "")),
        "ss_full_fp16": "False",
        "ss_cache_latents": str(bool(train.get("cache_latents", True))),
        "ss_seed": str(train.get("seed", "")),
        "ss_noise_offset": str(train.get("noise_offset") or None),
        "ss_min_snr_gamma": str(train.get("min_snr_gamma") or None),
        "ss_zero_terminal_snr": "False",
        "ss_prior_loss_weight": "1.0",
        "ss_loss_type": "l2",
        "ss_clip_skip": "None",
        "ss_max_token_length": "None",
        "ss_training_comment": f"trained with lora {r.info.get('lora_version', __version__)}"
                               + (f"; trigger: {trigger}" if trigger else ""),
    }


def _epoch_number(r: Run, accum: int) -> int:
    """The epoch this checkpoint belongs to, counted from 1 as sd-scripts does."""
    micro, per_epoch = r.state.get("micro_batches"), r.state.get("batches_per_epoch")
    if micro and per_epoch:
        return max(1, math.ceil(micro / per_epoch))
    return (r.epoch or 0) + 1


def _dirs_from_tags(data: dict) -> dict:
    """Runs trained before dataset.json recorded its folders: the tag-frequency folders."""
    import re

    folders = list(data.get("tag_frequency", {}))
    dirs = {}
    for folder in folders:
        m = re.match(r"^(\d+)_", folder)
        dirs[folder] = {"n_repeats": int(m.group(1)) if m else 1}
        if len(folders) == 1 and data.get("num_images"):
            dirs[folder]["img_count"] = int(data["num_images"])
    return dirs


def _vae(vae: str, keep_paths: bool) -> dict[str, str]:
    if not vae:
        return {}
    from pathlib import Path

    path = Path(vae).expanduser()
    out = {"ss_vae_name": provenance.public_path(vae, keep_paths) if path.exists() else vae}
    if path.is_file():
        out["ss_vae_hash"], out["ss_new_vae_hash"] = provenance.file_hashes(path)
    return out


def _session_id(r: Run) -> int:
    """A stable stand-in for sd-scripts' random session id: the same run gives the same id."""
    seed = f"{r.info.get('started_at', '')}|{r.info.get('profile', '')}|{r.dir.name}".encode()
    return int.from_bytes(hashlib.sha256(seed).digest()[:4], "big") % (2**31)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _epoch(iso: str) -> str:
    try:
        return str(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp())
    except ValueError:
        return ""


def serialize(tensors: dict, header: dict) -> bytes:
    """safetensors bytes with the hashes WebUI shows: `sshs_model_hash` (sha256 after the header),
    `sshs_legacy_hash` (A1111's legacy hash of the file saved with its `ss_*` keys only, as
    sd-scripts' `precalculate_safetensors_hashes` computes it) and `modelspec.hash_sha256`."""
    from safetensors.torch import save

    data = save(tensors, metadata=header)
    size = int.from_bytes(data[:8], "little")
    digest = hashlib.sha256(data[8 + size:]).hexdigest()
    ss_only = save(tensors, metadata={k: v for k, v in header.items() if k.startswith("ss_")})
    legacy = hashlib.sha256(ss_only[provenance.LEGACY_OFFSET:
                                    provenance.LEGACY_OFFSET + provenance.LEGACY_SIZE]).hexdigest()[:8]
    hashes = {"sshs_model_hash": digest, "modelspec.hash_sha256": "0x" + digest}
    if any(k.startswith("ss_") for k in header):
        hashes["sshs_legacy_hash"] = legacy
    return save(tensors, metadata={**header, **hashes})


def same_safetensors(a: bytes, b: bytes) -> bool:
    """Equal tensors and header; the header's key order is not stable between writes."""
    try:
        na, nb = int.from_bytes(a[:8], "little"), int.from_bytes(b[:8], "little")
        return a[8 + na:] == b[8 + nb:] and json.loads(a[8:8 + na]) == json.loads(b[8:8 + nb])
    except ValueError:
        return False
