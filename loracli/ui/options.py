"""Options and arguments that several commands share, declared once as `Annotated` aliases.

    def export(run: RunArg, json: JsonOpt = False) -> None: ...

Each alias carries its flag names, help and shell completion, so `--json` means the same thing
and `lora export <TAB>` completes the same runs everywhere. Nothing heavy is imported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from loracli.ui import completers

JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print one JSON document on stdout, whatever the outcome (README: JSON output).")]

# profiles
ProfileNameArg = Annotated[str, typer.Argument(
    metavar="NAME", help="Profile name (letters, digits, '.', '_', '-').",
    autocompletion=completers.profile_names)]
ProfileOrFileArg = Annotated[str, typer.Argument(
    metavar="PROFILE", help="Profile name or a .toml/.yaml file.",
    autocompletion=completers.profile_names)]
ProfileOpt = Annotated[Optional[str], typer.Option(
    "--profile", "-p", help="Profile name or a .toml/.yaml file (default: default).",
    autocompletion=completers.profile_names)]
ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="A profile file (TOML/YAML), read as a file, never as a name.")]
SetOpt = Annotated[Optional[List[str]], typer.Option(
    "--set", metavar="SECTION.KEY=VALUE",
    help="Override one key for this command (repeatable), e.g. --set train.max_steps=200.")]

# runs
RunArg = Annotated[str, typer.Argument(
    metavar="RUN", help="The run's output folder (e.g. output/anime), or its profile name.",
    autocompletion=completers.runs)]
ProcessesOpt = Annotated[Optional[int], typer.Option(
    "--processes", min=1, help="Training processes (GPUs) via accelerate; must keep the run's "
                               "global batch when resuming.")]
LoraFileArg = Annotated[Path, typer.Argument(
    metavar="FILE", help="A kohya, diffusers or peft LoRA (.safetensors or peft folder).",
    autocompletion=completers.lora_files)]

# models and mirrors
ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="Alias (sd15, sd21, sd21-base, sdxl, clip-vit-l-14, tiny-sd), org/name[@revision], "
         "or a hub URL.", autocompletion=completers.models)]
CachedModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", help="A cached model: alias or org/name.", autocompletion=completers.cached_models)]
MirrorOpt = Annotated[Optional[str], typer.Option(
    "--mirror", "-m", help="Mirror name or URL (default: `lora mirror use`, or LORA_MIRROR).",
    autocompletion=completers.mirrors)]
MirrorArg = Annotated[str, typer.Argument(
    metavar="MIRROR", help="Mirror name (or an http(s) URL).", autocompletion=completers.mirrors)]
TimeoutOpt = Annotated[Optional[float], typer.Option(
    "--timeout", help="Seconds without data before a mirror counts as stalled "
                      "(default 30, or LORA_TIMEOUT).")]

# several machines: accelerate's own names; each machine runs the same command
MachinesOpt = Annotated[Optional[int], typer.Option(
    "--num-machines", min=1, help="Machines training together (--processes is per machine).")]
RankOpt = Annotated[Optional[int], typer.Option(
    "--machine-rank", min=0, help="This machine's rank; 0 is the main one.")]
IpOpt = Annotated[Optional[str], typer.Option(
    "--main-process-ip", help="Machine 0's address, seen by every machine.")]
PortOpt = Annotated[Optional[int], typer.Option(
    "--main-process-port", min=0, max=65535,
    help="Port on machine 0 where the machines meet (default 29500).")]
AccelerateConfigOpt = Annotated[Optional[str], typer.Option(
    "--accelerate-config", help="An accelerate config file.")]
WaitOpt = Annotated[bool, typer.Option(
    "--wait", help="Queue behind a trainer of the same run, not exit 2.")]
