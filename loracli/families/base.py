"""What every model family answers, so that the trainer, export and inspection never ask for a name.

A family is data plus a few small functions (`loracli.families.sd` builds SD1, SD2 and SDXL from
one dataclass). The rest of `loracli` reads only what this protocol names:

- components: which folders of a diffusers model it loads, which are text encoders/tokenizers,
  how it is recognised (from a folder's configs or a single file's tensor names), and which
  cached model's configs describe a single-file checkpoint of it;
- geometry: latent channels, pixels per latent pixel and scaling, read from the VAE config
  (`Geometry`), never assumed;
- conditioning: captions → tensors (`encode`) → the denoiser's keyword arguments (`conditioning`),
  and the call of the denoiser itself (`denoiser` names its component, `forward` calls it:
  a UNet, or FLUX's transformer on 2x2-packed latents; `loracli.families.flux`, `.sd3`);
- the training objective (`objective(prediction_type)`, see `loracli.families.objectives`);
- default LoRA targets, the sampling pipeline class, the kohya key layout, and the versions that
  export metadata and `lora inspect` write and read;
- how its runs start, train, export and are inspected (`runs`, a `RunKind`): the diffusion
  families share `DIFFUSION`; a causal LM has its own (`loracli.families.causal_lm`).
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Protocol

from loracli.errors import LoraError
from loracli.families.objectives import Objective


@dataclass(frozen=True)
class Geometry:
    """How pixels become the latents the denoiser sees (from the VAE and denoiser configs)."""

    latent_channels: int
    downsample: int            # pixels per latent pixel along a side: 2 ** (VAE blocks - 1)
    scaling: float             # latents are (mean - shift) * scaling before noising
    shift: float
    denoiser_multiple: int = 1  # latent sides the denoiser wants divisible by (its downsamplings)

    @property
    def pixel_multiple(self) -> int:
        """Image sides (bucket sizes) must be multiples of this many pixels."""
        return self.downsample * self.denoiser_multiple

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.latent_channels, height // self.downsample, width // self.downsample)

    def to_model(self, latents):
        """Raw VAE posterior means (what the latent cache stores) → the denoiser's input scale."""
        return (latents - self.shift) * self.scaling


def vae_geometry(vae_config: Mapping, denoiser_config: Mapping, where: str = "the model"
                 ) -> Geometry:
    """`Geometry` of an AutoencoderKL + UNet pair; a VAE that does not fit the UNet is refused."""
    try:
        blocks = list(vae_config["block_out_channels"])
        channels = int(vae_config["latent_channels"])
        scaling = float(vae_config.get("scaling_factor") or 1.0)
        shift = float(vae_config.get("shift_factor") or 0.0)
        down = len(denoiser_config.get("block_out_channels") or [0]) - 1
    except (KeyError, TypeError, ValueError) as e:
        raise LoraError(f"{where}: the VAE config is not an AutoencoderKL config "
                        f"({type(e).__name__}: {e})",
                        "point model.vae (or the base model's vae/) at a diffusers VAE folder "
                        "with a complete config.json") from None
    if not blocks or channels < 1:
        raise LoraError(f"{where}: the VAE config has no blocks or no latent channels",
                        "point model.vae at a diffusers VAE folder with a complete config.json")
    wanted = denoiser_config.get("in_channels")
    if wanted is not None and int(wanted) != channels:
        raise LoraError(f"{where}: the VAE makes {channels}-channel latents but the denoiser "
                        f"takes {wanted} channels",
                        "use the VAE made for this base model: set model.vae = \"\" or to a "
                        "VAE of the same family")
    return Geometry(channels, 2 ** (len(blocks) - 1), scaling, shift, 2 ** max(down, 0))


@dataclass(frozen=True)
class RunKind:
    """How a family's runs are started, trained, exported and inspected.

    Each hook is a "module:attribute" reference, imported when used: the implementations (the
    training loop's tasks, the exporters) import `loracli.families`, so a family cannot import
    them. `runs.start`, the loop, `lora export` and `lora inspect` call only these:

    start   (run_dir, profile, version, warn): writes profile.toml, dataset.json, run.json
    task    (run_dir, profile, accelerator, weight_dtype, resumed, warn, status): the loop's task
    export  (run_dir, format, step, dtype, output, name, force, weight, keep_paths): one export
    """

    start: str
    task: str
    export: str
    formats: tuple[str, ...]   # `lora export --format` values; the first is the default
    unit: str = "images"       # what one example of a batch is, in messages
    inspect: str = ""          # (path) -> the `lora inspect` report of a file with a suffix below
    inspects: tuple[str, ...] = ()

    def load(self, hook: str):
        module, _, attribute = getattr(self, hook).partition(":")
        found = importlib.import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
        return found


DIFFUSION = RunKind(start="loracli.training.diffusion:start_run",
                    task="loracli.training.diffusion:DiffusionTask",
                    export="loracli.exporting.export:export_run",
                    formats=("kohya", "diffusers", "peft", "merged"))


class Configs:
    """A diffusers folder's JSON configs, read on demand (detection reads no weights)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._seen: dict[str, dict] = {}

    def read(self, relative: str) -> dict:
        """The parsed file, or {} when it is missing or unreadable (detection guesses on)."""
        if relative not in self._seen:
            try:
                self._seen[relative] = json.loads((self.folder / relative).read_text("utf-8"))
            except (OSError, ValueError):
                self._seen[relative] = {}
        return self._seen[relative]

    @property
    def index(self) -> dict:
        return self.read("model_index.json")

    def component(self, name: str) -> dict:
        return self.read(f"{name}/config.json")


class Family(Protocol):
    """The one seam between `loracli` and a model family (see the module docstring)."""

    name: str                          # run.json's base.family; profile model.family
    components: tuple[str, ...]        # folders loaded, in order: denoiser, vae, encoders, …
    denoiser: str                      # the component that denoises ("unet", "transformer")
    trainable: tuple[str, ...]         # components that can carry a LoRA: denoiser, encoders
    text_encoders: tuple[str, ...]     # component names, in encoding order
    tokenizers: tuple[str, ...]
    pipeline: str                      # diffusers pipeline class for samples and single files
    unet_targets: tuple[str, ...]      # default LoRA target modules of the denoiser
    text_targets: tuple[str, ...]      # … and of the text encoders
    kohya_prefixes: Mapping[str, str]  # component → kohya key prefix (lora_unet, lora_te1, …)
    kohya_unet_layout: str             # "diffusers", "ldm" (SDXL), "flux", "mmdit": kohya key names
    base_version: str                  # ss_base_model_version
    ss_v2: bool                        # kohya's ss_v2 flag
    modelspec_prefix: str              # modelspec.architecture starts with this
    context_width: int | None          # cross-attention width of the real models (inspection)
    openclip_encoders: tuple[str, ...]  # text encoders A1111 runs as OpenCLIP (SD2, SDXL's 2nd)
    projection_encoders: tuple[str, ...]  # encoders whose text_projection ComfyUI patches
    runs: RunKind                      # how its runs start, train, export (DIFFUSION for images)

    def recognizes(self, configs: Configs) -> bool: ...
    def claims_base(self, base: str) -> bool: ...  # model.base is its own (auto, before loading)
    def recognizes_checkpoint(self, keys: list[str]) -> bool: ...
    def config_alias(self, prediction: str) -> str: ...
    def geometry(self, vae_config: Mapping, denoiser_config: Mapping, where: str) -> Geometry: ...
    def objective(self, prediction_type: str) -> Objective: ...
    def encode(self, encoders: list, tokenizers: list, captions: list[str], device) -> dict: ...
    def conditioning(self, text: dict, sizes: dict) -> dict: ...
    def forward(self, denoiser, noisy, timesteps, cond: dict): ...  # the prediction, latent-shaped
    def modelspec(self, prediction_type: str) -> tuple[str, str]: ...

