"""The base-model check behind every export: a LoRA module that names no module of the base model
would load in WebUI with a warning and do nothing, so nothing is written unless every module (and,
for kohya files, every key read back) lands on a real weight of the right shape.

Module shapes come from the base's safetensors headers (no weights read), or, for a single-file
base with a config folder only, from the model built on the meta device from its config.
"""

from __future__ import annotations

from pathlib import Path

from loracli.errors import LoraError
from loracli.exporting import convert
from loracli.exporting.trained import Run, read_json


def base_folder(r: Run) -> tuple[Path, Path]:
    """(the base weights: a diffusers folder or a single file, the diffusers folder describing it)."""
    base = r.info.get("base", {})
    path = Path(base["path"]).expanduser() if base.get("path") else None
    if path is None or not path.exists():
        model = base.get("model") or r.profile.get("model", {}).get("base")
        if not model:
            raise LoraError(f"{r.dir}/run.json names no base model", "re-run `lora train` for this run")
        from loracli.hub import models

        path = models.local_snapshot(model)
    if path.is_dir():
        return path, path
    config_dir = Path(base.get("config_dir") or "").expanduser()
    from loracli import families

    denoiser = families.get(r.family).denoiser if r.family in families.names() else "unet"
    if not base.get("config_dir") or not (config_dir / denoiser / "config.json").is_file():
        raise LoraError(f"{path} is a single-file checkpoint and run.json names no diffusers "
                        "config folder for it", "lora fetch sd15 (or sdxl, sd21) for the configs")
    return path, config_dir


def base_modules(base: Path, component: str) -> dict[str, tuple]:
    """Module path → weight shape of one component: from its safetensors headers, else (configs
    only, as for a single-file base) from the model built on the meta device from its config."""
    from safetensors import safe_open

    files = sorted((base / component).glob("*.safetensors"))
    if not files:
        return modules_from_config(base / component, component)
    shapes = {}
    for f in files:
        with safe_open(str(f), "pt") as weights:
            for key in weights.keys():
                if key.endswith(".weight"):
                    path = key[: -len(".weight")]
                    if component != "unet" and _is_clip_text_model(base / component):
                        path = path.removeprefix("text_model.")
                    shapes[path] = tuple(weights.get_slice(key).get_shape())
    return shapes


def modules_from_config(folder: Path, component: str) -> dict[str, tuple]:
    if not (folder / "config.json").is_file():
        raise LoraError(f"{folder}: the base model has no {component} to check the LoRA against",
                        "lora fetch MODEL gets the whole diffusers folder")
    import torch

    with torch.device("meta"):
        if component == "unet":
            from diffusers import UNet2DConditionModel

            model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(folder)))
        else:
            import transformers

            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            model = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])(config)
    return {name[: -len(".weight")]: tuple(p.shape) for name, p in model.named_parameters()
            if name.endswith(".weight")}


def _is_clip_text_model(folder: Path) -> bool:
    """transformers 5 `CLIPTextModel` has no `.text_model`; old files still carry the prefix."""
    return "CLIPTextModel" in read_json(folder / "config.json").get("architectures", [])


def check_against_base(modules: list, base: Path) -> dict[str, dict]:
    """Every module must exist in the base model with fitting shapes; returns the base's modules."""
    problems, found = [], {}
    for component in sorted({m.component for m in modules}):
        shapes = found[component] = base_modules(base, component)
        for m in (m for m in modules if m.component == component):
            shape = shapes.get(m.path)
            if shape is None:
                problems.append(f"{component}.{m.path}: no such module in the base model")
            elif m.down.shape[1] != shape[1] or m.up.shape[0] != shape[0]:
                problems.append(f"{component}.{m.path}: LoRA {m.up.shape[0]}x{m.down.shape[1]} "
                                f"does not fit the base weight {shape}")
    _refuse(problems, base)
    return found


def check_kohya_keys(tensors: dict, found: dict[str, dict], family: str, unet_config: dict) -> None:
    """Every key of the file, read back, names a module of the base model (trap: a key a WebUI
    cannot match is skipped with a warning, and the LoRA silently does less)."""
    names = {}
    for component, shapes in found.items():
        for path in shapes:
            try:
                names[convert.kohya_stem(component, path, family, unet_config)] = path
            except convert.ConversionError:
                pass
    problems = sorted({f"{key.split('.')[0]}: names no module of the base model"
                       for key in tensors if key.split(".")[0] not in names})
    _refuse(problems, None)


def _refuse(problems: list[str], base: Path | None) -> None:
    if problems:
        where = f" {base}" if base else ""
        raise LoraError(f"{len(problems)} LoRA module(s) do not map onto the base model{where}; "
                        "nothing was written", "was the run trained on another base model? "
                        "check run.json's base.path, or `lora fetch` the model it names",
                        details=problems[:10] + ([f"… and {len(problems) - 10} more"]
                                                 if len(problems) > 10 else []))
