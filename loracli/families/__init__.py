"""The registry of model families: `get(name)`, `register(family)`, `detect(folder)`.

Adding a family is one module that builds a `Family` (see `loracli.families.base`) plus a
`register` call; nothing else in `loracli` tests a family's name. Detection asks the newest
registered family first, so the general ones (SD1: "a UNet and a text encoder") go first and
anything more specific registered later wins. Base-model resolution and component loading live
in `loracli.families.loading`.

Importing this package is cheap (no torch): profiles validate `model.family` against `names()`.
"""

from __future__ import annotations

from pathlib import Path

from loracli.errors import LoraError
from loracli.families.base import Configs, Family, Geometry, RunKind
from loracli.families.causal_lm import FAMILIES as _CAUSAL_LM
from loracli.families.flux import FAMILIES as _FLUX
from loracli.families.sd import FAMILIES as _SD
from loracli.families.sd3 import FAMILIES as _SD3

# most general first: detection asks the last one first
_BUILT_IN = (*_SD, *_FLUX, *_SD3, *_CAUSAL_LM)

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make `family` known by its name (a later registration of the same name replaces it)."""
    _REGISTRY.pop(family.name, None)
    _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Forget a family (tests register toy families and clean up after themselves)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all() -> tuple[Family, ...]:  # noqa: A001 - the registry's own word for "every family"
    return tuple(_REGISTRY.values())


def get(name: str) -> Family:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise LoraError(f"unknown model family {name!r}",
                        f"set model.family to auto or one of: {', '.join(names())}") from None


def of_run(info: dict) -> Family:
    """The family of a run, from its run.json (runs from before families were recorded: SD1)."""
    return get((info.get("base") or {}).get("family") or "sd1")


def for_base(name: str, base: str) -> Family:
    """The family a profile trains: model.family when named; for "auto", the newest family that
    claims model.base by itself (a causal LM's config.json), else SD1, whose run start detects
    the diffusion family from the base's own files (`loracli.families.loading.resolve_base`)."""
    if name != "auto":
        return get(name)
    return next((f for f in reversed(all()) if f.claims_base(base)), get("sd1"))


def detect(folder: Path) -> str:
    """The family of a diffusers folder, from its configs (no weights are read)."""
    configs = Configs(folder)
    if not configs.index:
        raise LoraError(f"{folder}: not a diffusers model folder (model_index.json is missing "
                        "or not valid JSON)",
                        "pass a folder with model_index.json, a .safetensors file, or an alias "
                        "such as sd15")
    for family in reversed(all()):
        if family.recognizes(configs):
            return family.name
    raise LoraError(f"{folder}: no known model family recognises this model "
                    f"(known: {', '.join(names())})",
                    f"set model.family to the family it belongs to ({', '.join(names())})")


def detect_checkpoint(keys: list[str], where: str) -> str:
    """The family of a single-file checkpoint from its tensor names."""
    for family in reversed(all()):
        if family.recognizes_checkpoint(keys):
            return family.name
    looks_like_lora = any(k.startswith(("lora_", "lora_unet")) or ".lora_" in k for k in keys)
    raise LoraError(f"{where}: not a checkpoint of a known model family"
                    + (" (its tensors are a LoRA, not a base model)" if looks_like_lora else ""),
                    "set model.base to a full model (.safetensors checkpoint or diffusers "
                    "folder), e.g. `lora fetch sd15` and model.base = \"sd15\"")


for _family in _BUILT_IN:
    register(_family)


__all__ = ["Configs", "Family", "Geometry", "RunKind", "all", "detect", "detect_checkpoint",
           "for_base", "get", "names", "of_run", "register", "unregister"]
