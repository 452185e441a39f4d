"""`lora inspect FILE`: what any kohya, diffusers or peft LoRA file holds, read from its header.

Only the safetensors header and the `.alpha` scalars are read, so a 1 GB file opens instantly.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from loracli import convert, families
from loracli.errors import LoraError



@dataclass(frozen=True)
class _Shape:
    shape: tuple


def inspect_lora(path: str | Path) -> dict:
    """Format, ranks, alphas, base model version, module counts and metadata of a LoRA file."""
    path = Path(path).expanduser()
    files = _files(path)
    entries, metadata, fmt, dtypes, size = [], {}, None, Counter(), 0
    for file, component in files:
        tensors, header = _read(file)
        size += file.stat().st_size
        dtypes.update(header.pop("__dtypes__"))
        fmt = fmt or convert.detect_format(tensors)
        if fmt == "kohya":
            entries += convert.kohya_entries(tensors)
        elif fmt == "diffusers":
            adapter = json.loads(header.get("lora_adapter_metadata", "null") or "null")
            entries += convert.diffusers_entries(tensors, adapter)
        elif fmt == "peft":
            config = _peft_config(file)
            entries += [convert.Entry(component or e.component, e.name, e.rank, e.alpha, e.kind)
                        for e in convert.peft_entries(tensors, config)]
        else:
            raise LoraError(f"{file}: no LoRA tensors found (neither kohya, diffusers nor peft keys)",
                            "pass a LoRA .safetensors file")
        metadata.update(header)
    if not entries:
        raise LoraError(f"{path}: no LoRA modules found", "pass a LoRA .safetensors file")
    modules = dict(sorted(Counter(e.component for e in entries).items()))
    return {
        "path": str(path),
        "format": fmt,
        "base_model_version": _version(metadata, entries, files, fmt),
        "name": metadata.get("ss_output_name") or metadata.get("modelspec.title") or "",
        "modules": modules,
        "ranks": sorted({e.rank for e in entries}),
        "alphas": sorted({round(e.alpha, 6) for e in entries}),
        "kinds": dict(Counter(e.kind for e in entries)),
        "dtypes": dict(dtypes),
        "size_bytes": size,
        "trigger_words": _triggers(metadata),
        "metadata": {k: _maybe_json(v) for k, v in sorted(metadata.items()) if k != "format"},
    }


def _files(path: Path) -> list[tuple[Path, str | None]]:
    """(file, component) pairs: one file, a peft adapter folder, or a folder of adapter folders."""
    if path.is_file():
        component = path.parent.name if path.parent.name in convert.COMPONENTS else None
        return [(path, component)]
    if path.is_dir():
        if (path / "adapter_model.safetensors").is_file():
            return [(path / "adapter_model.safetensors",
                     path.name if path.name in convert.COMPONENTS else None)]
        found = [(path / c / "adapter_model.safetensors", c) for c in convert.COMPONENTS
                 if (path / c / "adapter_model.safetensors").is_file()]
        if not found and (path / "pytorch_lora_weights.safetensors").is_file():
            found = [(path / "pytorch_lora_weights.safetensors", None)]
        if found:
            return found
        raise LoraError(f"{path}: a folder without a LoRA in it",
                        "pass the .safetensors file, or a peft folder with adapter_model.safetensors")
    raise LoraError(f"{path}: no such file", "check the path; `ls` it")


def _read(file: Path) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    if file.suffix != ".safetensors":
        raise LoraError(f"{file}: only .safetensors LoRA files can be inspected",
                        "pickled .pt/.ckpt files can run code when opened; ask for a .safetensors")
    try:
        with safe_open(str(file), "pt") as f:
            header = dict(f.metadata() or {})
            tensors, dtypes = {}, Counter()
            for key in f.keys():
                piece = f.get_slice(key)
                dtypes[piece.get_dtype()] += 1
                tensors[key] = f.get_tensor(key) if key.endswith(".alpha") else _Shape(tuple(piece.get_shape()))
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{file}: not a readable safetensors file ({e})",
                        "the download may be incomplete; fetch it again") from None
    header["__dtypes__"] = dtypes
    return tensors, header


def _peft_config(file: Path) -> dict | None:
    config = file.parent / "adapter_config.json"
    try:
        return json.loads(config.read_text("utf-8"))
    except (OSError, ValueError):
        return None


def _version(metadata: dict, entries: list, files: list, fmt: str) -> str:
    if metadata.get("ss_base_model_version"):
        return metadata["ss_base_model_version"]
    arch = metadata.get("modelspec.architecture", "")
    for family in families.all():
        if arch.startswith(family.modelspec_prefix):
            return family.base_version
    components = {e.component for e in entries}
    ldm = any("input_blocks" in e.name for e in entries)
    for family in families.all():  # a second text encoder, or UNet names in the LDM layout
        if ("text_encoder_2" in components and "text_encoder_2" in family.kohya_prefixes) or \
                (ldm and family.kohya_unet_layout == "ldm"):
            return family.base_version
    # the cross-attention context width (the text encoder's hidden size) tells the family
    width = _context_width(files)
    return next((f.base_version for f in families.all() if width and f.context_width == width),
                "unknown")


def _context_width(files) -> int | None:
    """The in-features of a cross-attention key projection (attn2 to_k), when the LoRA has one."""
    from safetensors import safe_open

    for file, _ in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "attn2" in key and "to_k" in key and ("lora_down" in key or "lora_A" in key
                                                         or "lora.down" in key):
                    return int(f.get_slice(key).get_shape()[1])
    return None


def _triggers(metadata: dict) -> list[str]:
    words = _maybe_json(metadata.get("loracli.trigger_words", ""))
    if isinstance(words, list) and words:
        return words
    phrase = metadata.get("modelspec.trigger_phrase") or ""
    return [phrase] if phrase else []


def _maybe_json(value: str):
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value
