"""A finished (or interrupted) run as `lora export` reads it: facts, frozen profile, one checkpoint.

Everything comes from the run folder (run.json, profile.toml, dataset.json, the checkpoint's peft
adapters and state.json); nothing is imported from the trainer, so export and training never
depend on each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from loracli import families
from loracli.errors import LoraError
from loracli.exporting import convert
from loracli.training import runs


@dataclass(frozen=True)
class Run:
    """What export reads from a run folder."""

    dir: Path
    info: dict
    profile: dict          # the frozen profile.toml as a mapping ({} when absent)
    dataset: dict
    step: int
    epoch: int | None      # epochs completed at this checkpoint (state.json)
    adapters: dict         # component → (peft state dict, adapter config)
    state: dict            # the checkpoint's state.json
    saved_at: float | None  # when the checkpoint was completed (its COMPLETE marker), unix time

    @property
    def family(self) -> str:
        return self.info.get("base", {}).get("family") or "sd1"


def read_run(run_dir: Path, step: int | None = None) -> Run:
    from safetensors.torch import load_file

    info = runs.info(run_dir)
    checkpoint = runs.latest(run_dir, step)
    state = read_json(checkpoint.path / "state.json")
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
                                   read_json(folder / "adapter_config.json"))
    if not adapters:
        raise LoraError(f"{checkpoint.path}: no adapter_model.safetensors in it",
                        "the checkpoint is not a LoRA checkpoint; pick another with --step N")
    marker = checkpoint.path / runs.MARKER
    saved_at = marker.stat().st_mtime if marker.is_file() else None
    return Run(Path(run_dir), info, profile, read_json(run_dir / "dataset.json"),
               checkpoint.step, state.get("epoch"), adapters, state, saved_at)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text("utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as e:
        raise LoraError(f"{path}: not valid JSON ({e})") from None


def modules_of(r: Run, format: str) -> list:
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
