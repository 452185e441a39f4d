"""Base models: from a profile's `model.base` to a checked local model, and its parts loaded.

`resolve_base` runs before a run folder is written, so every problem a user can cause with a
base model or a VAE override is reported there, as an `error:` with a `hint:`: a missing or
damaged file, a folder without one of its parts, a config that is not JSON, a VAE whose
latents do not fit the UNet, and any pickled file (.ckpt, .pt, .bin), which lora never opens
because unpickling can run code. `load_components` then loads only safetensors weights, offline,
and translates whatever a loader still raises into the same kind of error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loracli import families
from loracli.errors import LoraError
from loracli.families.base import Configs, Family

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
PICKLES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
DAMAGED = "the file is damaged or was cut short: download it again"


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


def prediction_type(folder: Path) -> str:
    config = Configs(folder).read("scheduler/scheduler_config.json")
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        return "flow_matching"  # FLUX, SD3: a flow-matching scheduler has no prediction_type
    return config.get("prediction_type") or "epsilon"


def _looks_like_path(name: str) -> bool:
    p = Path(name).expanduser()
    return p.exists() or name.startswith((".", "/", "~")) or p.suffix.lower() in SINGLE_FILE_SUFFIXES


def _refuse_pickle(path: Path, key: str) -> None:
    if path.suffix.lower() in PICKLES:
        raise LoraError(f"{path}: a pickled checkpoint ({path.suffix}); lora never opens "
                        "pickles, because loading one can run any code in it",
                        f"convert it to .safetensors in a tool you trust (e.g. kohya's or WebUI's "
                        f"checkpoint converter) and set {key} to the .safetensors file")


def safetensors_keys(path: Path, key: str, fix: str | None = None) -> list[str]:
    """The tensor names of a .safetensors file; a damaged or foreign file is a LoraError."""
    from safetensors import safe_open

    _refuse_pickle(path, key)
    if path.suffix.lower() not in (".safetensors", ".sft"):
        raise LoraError(f"{path}: not a .safetensors model file",
                        f"set {key} to a .safetensors checkpoint or a diffusers folder")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError and OSError: the file is the problem
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LoraError(f"{path}: not a readable .safetensors file ({reason})",
                        fix or f"{DAMAGED}, or set {key} to another model") from None


def _json(path: Path, what: str, fix: str) -> dict:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise LoraError(f"{path.parent}: {what} has no {path.name}", fix) from None
    except (OSError, ValueError) as e:
        raise LoraError(f"{path}: not valid JSON ({type(e).__name__}: {e})", fix) from None
    if not isinstance(data, dict):
        raise LoraError(f"{path}: not a config (a JSON object was expected)", fix)
    return data


def check_component(folder: Path, name: str, fix: str, cls: str = "") -> dict:
    """A diffusers component folder: present, its config JSON, safetensors weights if a model.

    `cls` is the class model_index.json names for it: a scheduler has scheduler_config.json,
    a tokenizer only its own files; anything else is a model with config.json and weights.
    """
    sub = folder / name
    if not sub.is_dir():
        raise LoraError(f"{folder}: has no {name}/ folder, which this model needs", fix)
    if cls.endswith("Scheduler"):
        return _json(sub / "scheduler_config.json", name, fix)
    if "Tokenizer" in cls:
        return {}  # its own loader reads what it needs
    config = _json(sub / "config.json", name, fix)
    weights = sorted(sub.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in sub.iterdir() if p.suffix in PICKLES)
        raise LoraError(f"{sub}: no .safetensors weights"
                        + (f" (only pickled {', '.join(pickled)}, which lora never opens)"
                           if pickled else ""), fix)
    for path in weights:  # headers only: a cut-short download is caught before a run starts
        safetensors_keys(path, "model.base", fix)
    return config


def check_vae(vae: str) -> dict | None:
    """A `model.vae` override checked like a base; its config (None for a single file)."""
    from loracli.hub import models

    path = Path(vae).expanduser()
    if not path.exists():
        if _looks_like_path(vae):
            raise LoraError(f"{vae}: no such VAE file or folder",
                            "fix model.vae in the profile, or set it to \"\" for the model's own")
        path = models.local_snapshot(vae)
    fix = "set model.vae to a diffusers VAE folder (config.json + .safetensors), or to \"\""
    if path.is_file():
        safetensors_keys(path, "model.vae")
        return None
    return check_component(path, "vae", fix) if (path / "vae").is_dir() \
        else check_component(path.parent, path.name, fix)


def _check_folder(path: Path, fam: Family, vae_override: bool, refetch: str) -> dict:
    """Every component `fam` loads is listed in model_index.json and present; their configs."""
    index, configs = Configs(path).index, {}
    for name in fam.components:
        if name == "vae" and vae_override:
            continue
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[1]):
            raise LoraError(f"{path}: model_index.json names no {name}, which a {fam.name} "
                            "model has", f"set model.family if it is not {fam.name}; else "
                            f"{refetch}")
        fix = refetch + (", or set model.vae to a VAE" if name == "vae" else "")
        configs[name] = check_component(path, name, fix, str(entry[1]))
    return configs


def resolve_base(model: str, family: str = "auto", prediction: str = "auto",
                 vae: str = "") -> Base:
    """A profile's model.base (and model.vae) → a checked local folder or file; no network.

    A model missing from the cache raises `LoraError` whose hint is the `lora fetch` command.
    """
    from loracli.hub import models

    repo = commit = None
    if _looks_like_path(model):
        as_path = Path(model).expanduser()
        if not as_path.exists():
            raise LoraError(f"{model}: no such model file or folder",
                            "check model.base in the profile, or use an alias: `lora fetch sd15`")
        path = as_path.resolve()
        refetch = "copy the whole diffusers folder again, or set model.base to another model"
    else:
        ref = models.resolve(model)
        path = models.local_snapshot(model)
        repo, commit = ref.repo_id, path.name if len(path.name) == 40 else None
        refetch = f"the cached copy is incomplete or damaged: `lora cache rm {model}`, then " \
                  f"`lora fetch {model}`"
    if path.is_file():
        keys = safetensors_keys(path, "model.base")
        fam = families.get(family) if family != "auto" else \
            families.get(families.detect_checkpoint(keys, str(path)))
        if getattr(fam, "check_single_file", None):  # what this family's loader cannot read
            fam.check_single_file(path)
        alias = fam.config_alias(prediction)
        try:
            config_dir = models.local_snapshot(alias)
        except LoraError as e:
            raise LoraError(f"{path.name} is a single-file checkpoint; its configs come from "
                            f"{alias}, which is not in the model cache",
                            f"lora fetch {alias}") from e
        if fam.denoiser == "transformer":  # its VAE and text encoders come from that model
            _check_folder(config_dir, fam, bool(vae), f"`lora cache rm {alias}`, then "
                          f"`lora fetch {alias}`")
    else:
        config_dir = path
        fam = families.get(family if family != "auto" else families.detect(path))
    configs = _check_folder(path, fam, bool(vae), refetch) if path.is_dir() else {}
    vae_config = check_vae(vae) if vae else configs.get("vae")
    if not vae:  # a single file holds its VAE; its config is borrowed with the others
        vae_config = vae_config or Configs(config_dir).component("vae")
    if vae_config:  # a single-file VAE override has no config to check before loading
        fam.geometry(vae_config, configs.get(fam.denoiser) or
                     Configs(config_dir).component(fam.denoiser),
                     f"model.vae {vae}" if vae else str(path))
    pred = prediction if prediction != "auto" else prediction_type(config_dir)
    fam.objective(pred)  # a prediction type the family cannot train is refused here, not later
    return Base(model, path, repo, commit, fam.name, pred, config_dir)


def _loaded(what: str, load):
    """Run a third-party loader; anything it raises about a user's file becomes a LoraError."""
    try:
        return load()
    except LoraError:
        raise
    except Exception as e:  # noqa: BLE001 - the translation point for model loading
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise LoraError(f"{what} could not be loaded ({type(e).__name__}: {reason})",
                        f"{DAMAGED}, or point the profile at another model") from e


def load_components(base: Base, family: Family, vae: str = "", quantize: str = "",
                    compute_dtype=None) -> dict:
    """The base model's parts by component name, on the CPU, fp32, offline, safetensors only
    (the denoiser 4-bit when `quantize` is "4bit", see `loracli.training.quantize`)."""
    from loracli.training import quantize as q

    import diffusers.utils.logging
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if base.path.is_file() and family.denoiser == "transformer":
        # BFL's and SAI's files hold the transformer (SAI's also a VAE, ComfyUI's sometimes the
        # encoders): it comes from the file, the rest from the cached model whose configs it uses
        parts = _from_folder(base.config_dir, family, vae, skip=family.denoiser)
        parts[family.denoiser] = _single_file_denoiser(base, family, q.load_kwargs(
            quantize, compute_dtype))
    elif base.path.is_file():
        import diffusers

        safetensors_keys(base.path, "model.base")
        pipe = _loaded(str(base.path), lambda: getattr(diffusers, family.pipeline).from_single_file(
            str(base.path), config=str(base.config_dir), local_files_only=True))
        parts = {n: getattr(pipe, n) for n in family.components}
    else:
        extra = q.load_kwargs(quantize, compute_dtype)  # 4bit: the denoiser is loaded as NF4
        parts = _from_folder(base.path, family, vae, skip=family.denoiser if extra else "")
        if extra:
            parts.update(_from_folder(base.path, family, vae, only=family.denoiser, extra=extra))
    if vae:
        parts["vae"] = _load_vae(vae)
    return parts


def _from_folder(folder: Path, family: Family, vae: str, skip: str = "", only: str = "",
                 extra: dict | None = None) -> dict:
    """Components of a diffusers folder by name (the VAE too unless `vae` overrides it)."""
    import importlib

    index = Configs(folder).index
    parts = {}
    for name in family.components:
        if (name == "vae" and vae) or name == skip or (only and name != only):
            continue
        if name not in index or index[name][0] is None:
            raise LoraError(f"{folder}: has no {name} (model_index.json)",
                            f"is it really an {family.name} model? set model.family")
        library, cls = index[name]
        loader = getattr(importlib.import_module(library), cls)
        kwargs = {"use_safetensors": True} if (folder / name / "config.json").is_file() else {}
        kwargs.update(extra or {})
        parts[name] = _loaded(f"{folder / name}", lambda: loader.from_pretrained(
            folder, subfolder=name, local_files_only=True, **kwargs))
    return parts


def _single_file_denoiser(base: Base, family: Family, extra: dict):
    return single_file_denoiser(base.path, base.config_dir, family, extra)


def single_file_denoiser(path: Path, config_dir: Path, family: Family, extra: dict | None = None):
    """The denoiser of a single-file checkpoint, through diffusers' converter for its class
    (the class and config of `config_dir`'s, the cached model the file belongs to)."""
    import importlib

    safetensors_keys(path, "model.base")
    library, cls = Configs(config_dir).index[family.denoiser]
    loader = getattr(importlib.import_module(library), cls)
    return _loaded(str(path), lambda: loader.from_single_file(
        str(path), config=str(config_dir), subfolder=family.denoiser, local_files_only=True,
        **(extra or {})))


def _load_vae(vae: str):
    from diffusers import AutoencoderKL

    from loracli.hub import models

    check_vae(vae)
    path = Path(vae).expanduser()
    if not path.exists():
        path = models.local_snapshot(vae)
    if path.is_file():
        return _loaded(f"model.vae {path}", lambda: AutoencoderKL.from_single_file(
            str(path), local_files_only=True))
    sub = "vae" if (path / "vae" / "config.json").is_file() else None
    return _loaded(f"model.vae {path}", lambda: AutoencoderKL.from_pretrained(
        path, subfolder=sub, local_files_only=True, use_safetensors=True))
