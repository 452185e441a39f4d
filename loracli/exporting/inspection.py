"""`lora inspect FILE`: what any kohya, diffusers or peft LoRA file holds, read from its header.

Only the safetensors header and the `.alpha` scalars are read, so a 1 GB file opens instantly.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from loracli import families
from loracli.errors import LoraError
from loracli.exporting import compat, convert, convert_dit


@dataclass(frozen=True)
class _Shape:
    shape: tuple


def inspect_lora(path: str | Path) -> dict:
    """Format, ranks, alphas, base model version, module counts and metadata of a LoRA file."""
    path = Path(path).expanduser()
    for family in families.all():  # a file of a family's own format (a causal LM's .gguf)
        if path.suffix.lower() in family.runs.inspects:
            return family.runs.load("inspect")(path)
    files = _files(path)
    entries, metadata, fmt, dtypes, size = [], {}, None, Counter(), 0
    for file, component in files:
        tensors, header = _read(file)
        size += file.stat().st_size
        dtypes.update(header.pop("__dtypes__"))
        fmt = fmt or detect_format(tensors)
        if fmt == "kohya":
            entries += kohya_entries(tensors)
        elif fmt == "diffusers":
            adapter = json.loads(header.get("lora_adapter_metadata", "null") or "null")
            entries += diffusers_entries(tensors, adapter)
        elif fmt == "peft":
            config = _peft_config(file)
            entries += [Entry(component or e.component, e.name, e.rank, e.alpha, e.kind)
                        for e in peft_entries(tensors, config)]
        else:
            raise LoraError(f"{file}: no LoRA tensors found (neither kohya, diffusers nor peft keys)",
                            "pass a LoRA .safetensors file")
        metadata.update(header)
    if not entries:
        raise LoraError(f"{path}: no LoRA modules found", "pass a LoRA .safetensors file")
    version, dit = metadata.get("ss_base_model_version", ""), None
    if fmt == "kohya":  # FLUX/SD3: kohya's lora_unet_ is the transformer (loracli.convert_dit)
        dit = convert_dit.kohya_family([e.name for e in entries], version)
    if dit is not None:
        entries = [replace(e, component=convert_dit.transformer_component(e.name, dit)
                           or e.component) for e in entries]
        version = version or _dit_version(dit, metadata.get("modelspec.architecture", ""))
    else:
        version = _version(metadata, entries, files, fmt)
    modules = dict(sorted(Counter(e.component for e in entries).items()))
    return {
        "path": str(path),
        "format": fmt,
        "base_model_version": version,
        "base_model": _recorded_base(files),
        "name": metadata.get("ss_output_name") or metadata.get("modelspec.title") or "",
        "modules": modules,
        "ranks": sorted({e.rank for e in entries}),
        "alphas": sorted({round(e.alpha, 6) for e in entries}),
        "kinds": dict(Counter(e.kind for e in entries)),
        "dtypes": dict(dtypes),
        "size_bytes": size,
        "trigger_words": _triggers(metadata),
        "metadata": {k: _maybe_json(v) for k, v in sorted(metadata.items()) if k != "format"},
        "compatibility": compatibility(entries, fmt, version),
    }


def compatibility(entries: list, fmt: str, version: str) -> list[dict]:
    """The per-loader report of `loracli.exporting.compat` for a kohya file (the layout every loader reads);
    other formats are read by diffusers/peft only, and get none."""
    if fmt != "kohya":
        return []
    family = next((f.name for f in families.all() if f.base_version == version), "")
    return compat.report([e.name for e in entries], family)


def detect_format(keys) -> str:
    """kohya | diffusers | peft | unknown, from tensor names alone."""
    keys = list(keys)
    kohya = tuple(prefix + "_" for prefix in convert.kohya_components())
    if keys and all(k.startswith(kohya) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.", "transformer.")) for k in keys):
        return "diffusers"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    return "unknown"


@dataclass(frozen=True)
class Entry:
    """One module of any LoRA file, for inspection (tensors not kept)."""

    component: str
    name: str
    rank: int
    alpha: float
    kind: str = "lora"   # lora | dora | loha | lokr | other


def kohya_entries(state_dict: dict) -> list[Entry]:
    stems: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        stem, _, leaf = key.partition(".")
        stems.setdefault(stem, {})[leaf] = tensor
    entries = []
    components = convert.kohya_components()
    longest_first = sorted(components, key=len, reverse=True)
    for stem, parts in sorted(stems.items()):
        prefix = next((p for p in longest_first if stem.startswith(p + "_")),
                      "_".join(stem.split("_", 2)[:2]))
        component = components.get(prefix, prefix)
        kind, rank = _kohya_kind(parts)
        alpha = float(parts["alpha"].float().item()) if "alpha" in parts else float(rank)
        entries.append(Entry(component, stem, rank, alpha, kind))
    return entries


def _kohya_kind(parts: dict) -> tuple[str, int]:
    if "lora_down.weight" in parts:
        return ("dora" if "dora_scale" in parts else "lora"), int(parts["lora_down.weight"].shape[0])
    if "hada_w1_b" in parts:
        return "loha", int(parts["hada_w1_b"].shape[0])
    if "lokr_w1" in parts or "lokr_w1_a" in parts:
        w = parts.get("lokr_w2_b", parts.get("lokr_w1_b"))
        return "lokr", int(w.shape[0]) if w is not None else 0
    return "other", 0


def diffusers_entries(state_dict: dict, adapter_metadata: dict | None) -> list[Entry]:
    by_component: dict[str, dict] = {}
    for key, tensor in state_dict.items():
        component, _, rest = key.partition(".")
        by_component.setdefault(component, {})[rest] = tensor
    entries = []
    for component, sd in sorted(by_component.items()):
        config = {k[len(component) + 1:]: v for k, v in (adapter_metadata or {}).items()
                  if k.startswith(component + ".")}
        entries += [Entry(component, e.name, e.rank, e.alpha, e.kind)
                    for e in peft_entries(sd, config or None)]
    return entries


def peft_entries(state_dict: dict, config: dict | None) -> list[Entry]:
    """Entries of a peft state dict; without a config alpha is unknown and reported as rank."""
    entries = []
    dora = {k.rsplit(".lora_magnitude_vector", 1)[0] for k in state_dict if "lora_magnitude_vector" in k}
    for key, tensor in sorted(state_dict.items()):
        for suffix in (".lora_A.weight", ".lora.down.weight", "_lora.down.weight"):
            if key.endswith(suffix):
                path = key[: -len(suffix)].removeprefix("base_model.model.")
                rank = int(tensor.shape[0])
                alpha = convert.peft_alpha(config, path, rank) if config else float(rank)
                entries.append(Entry("model", path, rank, alpha,
                                     "dora" if key[: -len(suffix)] in dora else "lora"))
    return entries


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


def _dit_version(dit, arch: str) -> str:
    """A FLUX/SD3 kohya file without ss_base_model_version: its modelspec architecture, or the
    version every family of its layout shares (FLUX.1 dev and schnell are both "flux1")."""
    alike = [f for f in families.all() if f.kohya_unet_layout == dit.kohya_unet_layout]
    named = [f.base_version for f in alike if arch and arch.startswith(f.modelspec_prefix)]
    shared = {f.base_version for f in alike}
    return named[0] if named else (shared.pop() if len(shared) == 1 else "unknown")


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


def _recorded_base(files) -> str:
    """The base model a peft adapter_config.json names (a language model's repo id), or ""."""
    for file, _ in files:
        name = (_peft_config(file) or {}).get("base_model_name_or_path")
        if isinstance(name, str) and name:
            return name
    return ""


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
