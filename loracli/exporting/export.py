"""`lora export`: a run's checkpoint as a file WebUI, ComfyUI and diffusers load with its exact effect.

Read the run (`loracli.exporting.trained`), convert the peft adapters (`loracli.exporting.convert`), check every module
against the base model's own weights (`loracli.exporting.basecheck`: a key that matches nothing would load
and do nothing), complete text-encoder attention sets some loaders need and report what each
loader applies (`loracli.exporting.compat`), add the metadata loaders and model sites read without local
paths (`loracli.exporting.metadata`, `loracli.exporting.provenance`), and write atomically (`loracli.exporting.folders` for the
folder formats). Nothing here touches the network.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loracli import atomic
from loracli.errors import LoraError
from loracli.exporting import basecheck, compat, convert, convert_dit, folders, provenance
from loracli.exporting.metadata import metadata, same_safetensors, serialize
from loracli.exporting.trained import Run, modules_of, read_json, read_run
from loracli.families.base import DIFFUSION
from loracli.training import runs

FORMATS = DIFFUSION.formats  # kohya, diffusers, peft, merged
DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: str
    name: str
    step: int
    dtype: str
    modules: dict = field(default_factory=dict)   # component → number of modules
    already: bool = False                          # an identical file was already there
    compat: list = field(default_factory=list)     # per-loader rows (kohya files), compat.report
    zero_modules: int = 0                          # zero-effect modules added for the loaders

    @property
    def snippet(self) -> str:
        return f"<lora:{self.name}:0.8>"

    @property
    def warnings(self) -> list[str]:
        return compat.warnings(self.compat)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "format": self.format, "name": self.name,
                "step": self.step, "dtype": self.dtype, "modules": self.modules,
                "already_exported": self.already, "prompt": self.snippet,
                "zero_modules": self.zero_modules, "compatibility": self.compat}


def export(run: str | Path, format: str | None = None, step: int | None = None,
           dtype: str = "fp16", output: str | Path | None = None, name: str | None = None,
           force: bool = False, weight: float = 1.0, keep_paths: bool = False):
    """Write one export of `run` (a run folder or a profile name); returns where and what.

    The run's family writes it (`family.runs.export`): images as below (`export_run`), a causal
    LM by `loracli.llm.runexport`; `format` defaults to the family's first format (kohya for
    images, peft for a language model)."""
    run_dir = runs.resolve(str(run))
    kind = runs.family_of(run_dir).runs
    return kind.load("export")(run_dir, format or kind.formats[0], step, dtype, output, name,
                               force, weight, keep_paths)


def export_run(run_dir: Path, format: str = "kohya", step: int | None = None,
               dtype: str = "fp16", output: str | Path | None = None, name: str | None = None,
               force: bool = False, weight: float = 1.0, keep_paths: bool = False
               ) -> ExportResult:
    """An image run's export: kohya, diffusers, peft or merged (`DIFFUSION.export`)."""
    if format not in FORMATS:
        raise LoraError(f"unknown format {format!r}", "use --format " + "|".join(FORMATS))
    if dtype not in DTYPES:
        raise LoraError(f"unknown dtype {dtype!r}", "use --dtype fp16, bf16 or fp32")
    if weight != 1.0 and format != "merged":
        raise LoraError("--weight only applies to --format merged",
                        "for the other formats set the strength where you load the LoRA, "
                        "e.g. <lora:NAME:0.8>")
    r = read_run(Path(run_dir), step)
    name = _check_name(name or r.info.get("profile") or r.dir.name)
    target = output_path(output, r.dir, name, format)
    base, config_dir = basecheck.base_folder(r)
    modules = modules_of(r, format)
    found = basecheck.check_against_base(modules, config_dir)
    counts = dict(Counter(m.component for m in modules))
    torch_dtype = _torch_dtype(dtype)
    identity = provenance.base_identity(r.info.get("base", {}), keep_paths)
    adapters = r.adapters if keep_paths else _public_adapters(r, identity)
    result = ExportResult(target, format, name, r.step, dtype, counts)
    if format == "merged":
        roots = [] if keep_paths else _local_roots(r, base, config_dir)
        folders.write_merged(target, r, base, config_dir, modules, weight, torch_dtype, force,
                             identity.name, roots)
        return result
    if format == "peft":
        header = metadata(r, name, modules, dtype, kohya=False, keep_paths=keep_paths)
        folders.write_peft(target, r, adapters, torch_dtype, header, force)
        return result
    padded, rows = 0, []
    if format == "kohya":
        unet_config = read_json(config_dir / "unet" / "config.json")
        zeros = zero_modules(modules, found, r.family)
        padded = len(zeros)
        try:  # FLUX/SD3: the original layout kohya writes, q/k/v fused (convert_dit)
            kohya, kohya_found = convert_dit.native(modules + zeros, found, r.family, config_dir)
            tensors = convert.to_kohya(kohya, r.family, unet_config, torch_dtype)
        except convert.ConversionError as e:
            raise LoraError(f"cannot export to kohya: {e}",
                            f"lora export {r.dir} --format diffusers writes any peft LoRA") from None
        basecheck.check_kohya_keys(tensors, kohya_found, r.family, unet_config)
        rows = compat.report([k.split(".")[0] for k in tensors], r.family)
        header = metadata(r, name, modules + zeros, dtype, keep_paths=keep_paths, padded=padded)
    else:
        tensors, header = convert.peft_to_diffusers(adapters, torch_dtype)
        header.update(metadata(r, name, modules, dtype, kohya=False, keep_paths=keep_paths))
    folders.check_finite(tensors, dtype)
    data = serialize(tensors, header)
    result = ExportResult(target, format, name, r.step, dtype, counts, compat=rows,
                          zero_modules=padded)
    if target.exists() and not force:
        if target.is_file() and same_safetensors(target.read_bytes(), data):
            return ExportResult(target, format, name, r.step, dtype, counts, already=True,
                                compat=rows, zero_modules=padded)
        raise folders.exists_error(target, r.dir)
    atomic.write_bytes(target, data)
    return result


def zero_modules(modules: list, found: dict[str, dict], family: str) -> list:
    """Zero-effect modules (lora_up = 0) completing the attention sets `compat.completions` names,
    with their encoder's rank and alpha (diffusers' kohya loader wants one alpha per encoder)."""
    import torch

    paths: dict[str, list[str]] = {}
    for m in modules:
        paths.setdefault(m.component, []).append(m.path)
    added = []
    for component, missing in compat.completions(paths, family).items():
        own = [m for m in modules if m.component == component]
        rank = Counter(m.rank for m in own).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in own).most_common(1)[0][0]
        for path in missing:
            out_features, in_features = found[component][path][:2]
            added.append(convert.LoraModule(component, path, torch.zeros(rank, in_features),
                                            torch.zeros(out_features, rank), alpha))
    return added


def _public_adapters(r: Run, identity) -> dict:
    """The adapters with configs that name the base publicly (peft's base_model_name_or_path)."""
    out = {}
    for component, (state_dict, config) in r.adapters.items():
        config = {**config, "base_model_name_or_path": identity.name}
        if identity.commit:
            config["revision"] = identity.commit
        out[component] = (state_dict, config)
    return out


def _local_roots(r: Run, base: Path, config_dir: Path) -> list[str]:
    roots = {str(p) for p in (base, config_dir, r.dir, base.resolve(), config_dir.resolve(),
                              r.dir.resolve())}
    home = str(Path.home())
    if home not in ("/", ""):
        roots.add(home)
    return sorted(roots)


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


def _torch_dtype(dtype: str):
    import torch

    return getattr(torch, DTYPES[dtype])
