"""The two folder formats of `lora export`: peft adapter folders and the merged pipeline.

Each is written beside its target under a temporary name and renamed into place at the end, so a
crash leaves the old export (or nothing), never half a folder. Neither names a local path: peft's
`base_model_name_or_path` and the merged pipeline's `_name_or_path` say the public base name.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from loracli import atomic
from loracli.errors import LoraError
from loracli.exporting.trained import Run

PEFT_PREFIX = "base_model.model."
MERGE_ADAPTER = "export"  # never "train": it would shadow nn.Module.train


def write_peft(target: Path, r: Run, adapters: dict, torch_dtype, header: dict, force: bool) -> None:
    """`<component>/adapter_model.safetensors` + `adapter_config.json`, what PeftModel loads."""
    from loracli.exporting.metadata import serialize

    with Folder(target, force, r.dir) as tmp:
        for component, (state_dict, config) in adapters.items():
            # PeftModel.save_pretrained's layout: keys under `base_model.model.`.
            tensors = {PEFT_PREFIX + k.removeprefix(PEFT_PREFIX): v.to(torch_dtype).contiguous()
                       for k, v in state_dict.items()}
            check_finite(tensors, str(torch_dtype))
            atomic.write_bytes(tmp / component / "adapter_model.safetensors",
                               serialize(tensors, header))
            atomic.write_json(tmp / component / "adapter_config.json", config)


def write_merged(target: Path, r: Run, base: Path, config_dir: Path, modules: list,
                 weight: float, torch_dtype, force: bool, public_name: str,
                 local_roots: list[str]) -> None:
    """The base pipeline with the LoRA folded in at `weight`, saved whole.

    Plain LoRA: `W += weight × alpha/r × up @ down`, what WebUI does at that strength. DoRA: peft's
    own merge with its scaling multiplied by `weight`, as diffusers' `set_adapters` applies it.
    """
    import torch

    from loracli.exporting import provenance

    if target.exists() and not force:
        raise exists_error(target, r.dir)
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
    with Folder(target, force, r.dir) as tmp:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        if local_roots:
            provenance.scrub_config_folder(tmp, public_name, local_roots)


def check_finite(tensors: dict, dtype: str) -> None:
    import torch

    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise LoraError(f"{len(bad)} tensor(s) are not finite in {dtype} (first: {bad[0]})",
                        "--dtype fp32 (or bf16) keeps large values; NaN means the run diverged")


def exists_error(target: Path, run_dir: Path) -> LoraError:
    return LoraError(f"{target} already exists", f"lora export {run_dir} --force replaces it; "
                     "-o PATH writes somewhere else")


def _load_pipeline(base: Path, config_dir: Path, family: str):
    import diffusers
    import torch

    if base.is_file():
        from loracli import families

        fam = families.get(family)
        cls = getattr(diffusers, fam.pipeline)
        if fam.denoiser == "transformer":  # BFL/SAI files: the rest from the cached model
            from loracli.families import loading

            denoiser = loading.single_file_denoiser(base, config_dir, fam)
            return cls.from_pretrained(str(config_dir), dtype=torch.float32,
                                       local_files_only=True, **{fam.denoiser: denoiser})
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


class Folder:
    """A folder written beside `target` under a temporary name and renamed into place at the end."""

    def __init__(self, target: Path, force: bool, run_dir: Path):
        self.target, self.force, self.run_dir = Path(target), force, run_dir

    def __enter__(self) -> Path:
        if self.target.exists() and not self.force:
            raise exists_error(self.target, self.run_dir)
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
