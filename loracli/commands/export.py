"""`lora export RUN`: a run's checkpoint as a LoRA file for WebUI, ComfyUI and diffusers."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from loracli.ui import output
from loracli.ui.options import JsonOpt, RunArg


class Format(str, Enum):
    kohya = "kohya"
    diffusers = "diffusers"
    peft = "peft"
    merged = "merged"
    gguf = "gguf"


class Dtype(str, Enum):
    fp16 = "fp16"
    bf16 = "bf16"
    fp32 = "fp32"


def export(
    run: RunArg,
    format: Optional[Format] = typer.Option(
        None, "--format", "-f",
        help="kohya (the default): WebUI/ComfyUI/diffusers file; diffusers: "
             "pytorch_lora_weights.safetensors; peft: adapter folders; merged: a full pipeline "
             "with the LoRA fused in. Language-model runs: peft (their default), merged, gguf "
             "(a llama.cpp/Ollama adapter)."),
    step: Optional[int] = typer.Option(None, "--step", help="Checkpoint step (default: newest complete)."),
    dtype: Dtype = typer.Option(Dtype.fp16, "--dtype", help="Tensor precision of the file."),
    out: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (file or folder)."),
    name: Optional[str] = typer.Option(None, "--name", help="The NAME in <lora:NAME:0.8> (default: the profile's)."),
    weight: float = typer.Option(1.0, "--weight", help="Strength fused in by --format merged."),
    force: bool = typer.Option(False, "--force", help="Replace an existing export."),
    keep_paths: bool = typer.Option(False, "--keep-paths",
                                    help="Keep local paths (base model, data folder) in the "
                                         "metadata; by default only base names and hub ids."),
    json: JsonOpt = False,
) -> None:
    """Export a trained LoRA (default: kohya .safetensors, the WebUI layout, fp16)."""
    from loracli.exporting import compat
    from loracli.exporting import export as exporting

    result = exporting.export(run, format=format.value if format else None, step=step,
                              dtype=dtype.value, output=out, name=name, force=force,
                              weight=weight, keep_paths=keep_paths)
    if result.already:
        output.note(f"already exported (identical file): {result.path}")
    else:
        output.note(f"exported step {result.step} as {result.format} ({result.dtype}): "
                    + ", ".join(f"{n} {c} modules" for c, n in result.modules.items())
                    + (f" + {result.zero_modules} zero-effect" if result.zero_modules else ""))
    for line in compat.summary(result.compat):
        output.note(f"  {line}")
    for line in result.warnings:
        output.warn(line)
    output.emit(result.to_dict(), json, _render)


def _render(result: dict) -> None:
    print(result["path"])
    if result["format"] == "kohya":
        print(result["prompt"])
