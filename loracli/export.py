"""`lora export`: a run's checkpoint as a file WebUI, ComfyUI and diffusers load with its exact effect.

Read the run (run.json, profile.toml, dataset.json, the chosen checkpoint), convert the peft
adapters with `loracli.convert`, check every module against the base model's own weights (a
key that matches nothing would load and do nothing), add the metadata loaders and model sites
read, and write atomically. Nothing here touches the network.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loracli import atomic, convert, families, runs
from loracli.metadata import metadata, same_safetensors, serialize
from loracli.errors import LoraError

FORMATS = ("kohya", "diffusers", "peft", "merged")
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
PEFT_PREFIX = "base_model.model."
MERGE_ADAPTER = "export"  # never "train": it would shadow nn.Module.train


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    name: str
    step: int
    dtype: str
    modules: dict = field(default_factory=dict)   # component → number of modules
    already: bool = False                          # an identical file was already there

    @property
    def snippet(self) -> str:
        return f"<lora:{self.name}:0.8>"

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "name": self.name,
                "step": self.step, "dtype": self.dtype, "modules": self.modules,
                "already_exported": self.already, "prompt": self.snippet}


@dataclass(frozen=True)
class Run:
    """What export reads from a run folder."""

    dir: Path
    info: dict
    profile: dict          # the frozen profile.toml as a mapping ({} when absent)
    dataset: dict
    step: int
    epoch: int | None
    adapters: dict         # component → (peft state dict, adapter config)

    @property
    def family(self) -> str:
        return self.info.get("base", {}).get("family") or "sd1"


def export(run: str | Path, format: str = "kohya", step: int | None = None, dtype: str = "fp16",
           output: str | Path | None = None, name: str | None = None, force: bool = False,
           weight: float = 1.0) -> ExportResult:
    """Write one export of `run` (a run folder or a profile name); returns where and what."""
    if format not in FORMATS:
        raise LoraError(f"unknown format {format!r}", "use --format " + "|".join(FORMATS))
    if dtype not in DTYPES:
        raise LoraError(f"unknown dtype {dtype!r}", "use --dtype fp16, bf16 or fp32")
    if weight != 1.0 and format != "merged":
        raise LoraError("--weight only applies to --format merged",
                        "for the other formats set the strength where you load the LoRA, "
                        "e.g. <lora:NAME:0.8>")
    r = read_run(runs.resolve(str(run)), step)
    name = _check_name(name or r.info.get("profile") or r.dir.name)
    target = output_path(output, r.dir, name, format)
    base, config_dir = base_folder(r)
    modules = _modules(r, format)
    found = check_against_base(modules, config_dir)
    counts = dict(Counter(m.component for m in modules))
    result = ExportResult(target, format, name, r.step, dtype, counts)
    torch_dtype = _torch_dtype(dtype)
    if format == "merged":
        _write_merged(target, r, base, config_dir, modules, weight, torch_dtype, force)
        return result
    if format == "peft":
        _write_peft(target, r, torch_dtype, metadata(r, name, modules, dtype), force)
        return result
    if format == "kohya":
        unet_config = _read_json(config_dir / "unet" / "config.json")
        try:
            tensors = convert.to_kohya(modules, r.family, unet_config, torch_dtype)
        except convert.ConversionError as e:
            raise LoraError(f"cannot export to kohya: {e}",
                            f"lora export {r.dir} --format diffusers writes any peft LoRA") from None
        check_kohya_keys(tensors, found, r.family, unet_config)
        header = metadata(r, name, modules, dtype)
    else:
        tensors, header = convert.peft_to_diffusers(r.adapters, torch_dtype)
        header.update(metadata(r, name, modules, dtype, kohya=False))
    _check_finite(tensors, dtype)
    data = serialize(tensors, header)
    if target.exists() and not force:
        if target.is_file() and same_safetensors(target.read_bytes(), data):
            return ExportResult(target, format, name, r.step, dtype, counts, already=True)
        raise _exists(target, r.dir)
    atomic.write_bytes(target, data)
    return result


# ---------------------------------------------------------------------------- reading a run

def read_run(run_dir: Path, step: int | None = None) -> Run:
    from safetensors.torch import load_file

    info = runs.info(run_dir)
    checkpoint = runs.latest(run_dir, step)
    state = _read_json(checkpoint.path / "state.json")
    profile = {}
    if (run_dir / "profile.toml").is_file():
        from loracli import profiles

        profile = profiles.read_mapping(run_dir / "profile.toml")
    adapters = {}
    family = families.get(info.get("base", {}).get("family") or "sd1")
    for component in family.trainable:
        folder = checkpoint.path / component
        if (folder / "adapter_model.safetensors").is_file():
            adapters[component] = (load_file(str(folder / "adapter_model.safetensors")),
                                   _read_json(folder / "adapter_config.json"))
    if not adapters:
        raise LoraError(f"{checkpoint.path}: no adapter_model.safetensors in it",
                        "the checkpoint is not a LoRA checkpoint; pick another with --step N")
    return Run(Path(run_dir), info, profile, _read_json(run_dir / "dataset.json"),
               checkpoint.step, state.get("epoch"), adapters)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from None


def _modules(r: Run, format: str) -> list:
    """The adapters in common form; DoRA only for the formats that keep it exactly.

    A1111 applies a kohya `dora_scale` per input column (LyCORIS' convention) while peft's DoRA
    normalises per output row, so a DoRA run written as kohya would load and do something else.
    """
    modules = []
    for component, (state_dict, config) in r.adapters.items():
        if config.get("use_dora"):
            if format == "kohya":
                raise LoraError(f"cannot export {r.dir} as kohya: its {component} adapter is DoRA, "
                                "which WebUI would apply differently from how it was trained",
                                f"lora export {r.dir} --format diffusers (diffusers loads DoRA "
                                "exactly), --format merged, or --format peft")
            # Only the low-rank part is needed to check the modules against the base model.
            config = {k: v for k, v in config.items() if k != "use_dora"}
            state_dict = {k: v for k, v in state_dict.items() if "lora_magnitude_vector" not in k}
        try:
            modules += convert.from_peft(component, state_dict, config)
        except convert.ConversionError as e:
            raise LoraError(f"cannot export {r.dir}: {e}",
                            f"lora export {r.dir} --format peft keeps the adapter as trained"
                            if format != "peft" else None) from None
    return modules


def base_folder(r: Run) -> tuple[Path, Path]:
    """(the base weights: a diffusers folder or a single file, the diffusers folder describing it)."""
    base = r.info.get("base", {})
    path = Path(base["path"]).expanduser() if base.get("path") else None
    if path is None or not path.exists():
        model = base.get("model") or r.profile.get("model", {}).get("base")
        if not model:
            raise LoraError(f"{r.dir}/run.json names no base model", "re-run `lora train` for this run")
        from loracli import models

        path = models.local_snapshot(model)
    if path.is_dir():
        return path, path
    config_dir = Path(base.get("config_dir") or "").expanduser()
    if not base.get("config_dir") or not (config_dir / "unet" / "config.json").is_file():
        raise LoraError(f"{path} is a single-file checkpoint and run.json names no diffusers "
                        "config folder for it", "lora fetch sd15 (or sdxl, sd21) for the configs")
    return path, config_dir


def default_path(run_dir: Path, name: str, format: str) -> Path:
    return {"kohya": run_dir / f"{name}.safetensors",
            "diffusers": run_dir / f"{name}-diffusers" / "pytorch_lora_weights.safetensors",
            "peft": run_dir / f"{name}-peft",
            "merged": run_dir / f"{name}-merged"}[format]


def output_path(output: str | Path | None, run_dir: Path, name: str, format: str) -> Path:
    """`-o`: a file for kohya (a folder gets NAME.safetensors in it) and diffusers (a folder gets
    pytorch_lora_weights.safetensors), a folder for peft and merged."""
    if output is None:
        return default_path(run_dir, name, format)
    target = Path(output).expanduser()
    if format in ("peft", "merged"):
        return target
    if target.is_dir() or str(output).endswith(("/", "\\")):
        return target / default_path(Path(), name, format).name
    if target.suffix != ".safetensors":
        if format == "diffusers":
            return target / "pytorch_lora_weights.safetensors"
        raise LoraError(f"{target}: a kohya LoRA file must end in .safetensors",
                        f"-o {target.with_suffix('.safetensors')}")
    return target


def _check_name(name: str) -> str:
    if not name or any(c in name for c in '/\\:<>"|?*') or name.startswith("."):
        raise LoraError(f"invalid name {name!r} for <lora:NAME:w>",
                        "use letters, digits, - and _, e.g. --name anime")
    return name


def _exists(target: Path, run_dir: Path) -> LoraError:
    return LoraError(f"{target} already exists", f"lora export {run_dir} --force replaces it; "
                     "-o PATH writes somewhere else")


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, DTYPES[dtype])


# ---------------------------------------------------------------------------- the base model check

def base_modules(base: Path, component: str) -> dict[str, tuple]:
    """Module path → weight shape of one component: from its safetensors headers, else (configs
    only, as for a single-file base) from the model built on the meta device from its config."""
    from safetensors import safe_open

    files = sorted((base / component).glob("*.safetensors"))
    if not files:
        return _modules_from_config(base / component, component)
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


def _modules_from_config(folder: Path, component: str) -> dict[str, tuple]:
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
    return "CLIPTextModel" in _read_json(folder / "config.json").get("architectures", [])


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


def _check_finite(tensors: dict, dtype: str) -> None:
    import torch

    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise LoraError(f"{len(bad)} tensor(s) are not finite in {dtype} (first: {bad[0]})",
                        "--dtype fp32 (or bf16) keeps large values; NaN means the run diverged")


# ---------------------------------------------------------------------------- folder formats

def _write_peft(target: Path, r: Run, torch_dtype, header: dict, force: bool) -> None:
    """`<component>/adapter_model.safetensors` + `adapter_config.json`, what PeftModel loads."""
    with _folder(target, force, r.dir) as tmp:
        for component, (state_dict, config) in r.adapters.items():
            # PeftModel.save_pretrained's layout: keys under `base_model.model.`.
            tensors = {PEFT_PREFIX + k.removeprefix(PEFT_PREFIX): v.to(torch_dtype).contiguous()
                       for k, v in state_dict.items()}
            _check_finite(tensors, str(torch_dtype))
            config = {**config, "base_model_name_or_path": r.info.get("base", {}).get("repo")
                      or r.info.get("base", {}).get("path")}
            atomic.write_bytes(tmp / component / "adapter_model.safetensors",
                               serialize(tensors, header))
            atomic.write_json(tmp / component / "adapter_config.json", config)


def _write_merged(target: Path, r: Run, base: Path, config_dir: Path, modules: list,
                  weight: float, torch_dtype, force: bool) -> None:
    """The base pipeline with the LoRA folded in at `weight`, saved whole.

    Plain LoRA: `W += weight × alpha/r × up @ down`, what WebUI does at that strength. DoRA: peft's
    own merge with its scaling multiplied by `weight`, as diffusers' `set_adapters` applies it.
    """
    import torch

    if target.exists() and not force:
        raise _exists(target, r.dir)
    with _quiet_diffusers():  # "modules kept in float32" noise on the casts
        pipe = _load_pipeline(base, config_dir, r.family)
        with torch.no_grad():
            for component, (state_dict, config) in r.adapters.items():
                if config.get("use_dora"):
                    _merge_with_peft(getattr(pipe, component), state_dict, config, weight)
            for m in modules:
                if not r.adapters[m.component][1].get("use_dora"):
                    layer = getattr(pipe, m.component).get_submodule(m.path)
                    layer.weight += weight * m.delta().to(layer.weight.dtype)
        pipe.to(torch_dtype)
    with _folder(target, force, r.dir) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)


def _load_pipeline(base: Path, config_dir: Path, family: str):
    import diffusers
    import torch

    if base.is_file():
        from loracli import families

        cls = getattr(diffusers, families.get(family).pipeline)
        return cls.from_single_file(str(base), config=str(config_dir), dtype=torch.float32,
                                    local_files_only=True)
    return diffusers.DiffusionPipeline.from_pretrained(str(base), dtype=torch.float32,
                                                       local_files_only=True)


def _merge_with_peft(model, state_dict: dict, config: dict, weight: float) -> None:
    import dataclasses

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer

    fields = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    lora_config = LoraConfig(**{k: v for k, v in config.items() if k in fields})
    inject_adapter_in_model(lora_config, model, adapter_name=MERGE_ADAPTER)
    loaded = set_peft_model_state_dict(model, state_dict, adapter_name=MERGE_ADAPTER)
    if loaded.unexpected_keys:
        raise LoraError(f"peft did not take {len(loaded.unexpected_keys)} adapter tensors "
                        f"(first: {loaded.unexpected_keys[0]})", "lora export RUN --format peft")
    for name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.scaling[MERGE_ADAPTER] *= weight
            layer.merge(adapter_names=[MERGE_ADAPTER])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())


class _quiet_diffusers:
    def __enter__(self):
        from diffusers.utils import logging as diffusers_logging

        self.logging = diffusers_logging
        self.verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()

    def __exit__(self, *exc):
        self.logging.set_verbosity(self.verbosity)


class _folder:
    """A folder written beside `target` under a temporary name and renamed into place at the end."""

    def __init__(self, target: Path, force: bool, run_dir: Path):
        self.target, self.force, self.run_dir = Path(target), force, run_dir

    def __enter__(self) -> Path:
        if self.target.exists() and not self.force:
            raise _exists(self.target, self.run_dir)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.target.parent, prefix=f".{self.target.name}."))
        return self.tmp

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        old = None
        if self.target.exists():
            old = self.target.parent / f".{self.target.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            self.target.rename(old)
        self.tmp.rename(self.target)
        atomic.fsync_dir(self.target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
