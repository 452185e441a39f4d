"""`lora demo`: the main job, end to end, on the embedded tiny model (no network, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from loracli import output
from loracli.options import JsonOpt

NEXT_STEPS = """\
The base was the tiny 64 px model (trained briefly on squares and triangles, never discs), so
pictures are 8x8 colour mosaics; the grid's last row is the LoRA's doing. For real work:
  lora fetch sd15 --mirror hf-mirror           # SD 1.5 through a mirror, resumable and verified
  lora caption data/my_style --prefix "sks style"
  lora profile new my-style --from style       # then `lora profile edit my-style`
  lora train --profile my-style                # Ctrl+C saves; `lora resume my-style` continues
  lora export my-style                         # -> <lora:my-style:0.8> in WebUI / ComfyUI"""


def demo(
    out: Path = typer.Option(Path("lora-demo"), "--output", "-o",
                             help="Folder for the demo's data, run and pictures."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1,
                                        help="Training steps (default: the demo profile's 600)."),
    json: JsonOpt = False,
) -> None:
    """The whole job on a tiny offline model: fetch, data, train, export, before/after grid.

    Ctrl+C saves and stops (exit 130); running the same command again continues the run and
    ends with the grid.
    """
    from loracli import demo as demo_lib, training, trainview

    stop = training.StopFlag()
    shown = trainview.view(output.is_terminal(sys.stderr), every=20)
    with stop.installed(output.note), shown:
        result = demo_lib.run(out, on_step=shown.on_step, on_stage=shown.say,
                              on_warning=output.warn, stop=stop, max_steps=steps,
                              on_start=shown.on_start, on_status=shown.on_status)
    again = f"lora demo --output {out}" + (f" --steps {steps}" if steps else "")
    stopped = result.status == "interrupted"
    document = {**result.to_dict(), "next": again if stopped else None}
    if stopped:
        output.note(f"demo stopped at step {result.steps}; `{again}` continues it from there "
                    "and ends with the before/after grid")
    output.emit(document, json, (lambda r: None) if stopped else _render)
    if stopped:
        sys.exit(130)


def _render(r: dict) -> None:
    output.note(f"denoising loss on your pictures: base {r['base_loss']:.4f} -> "
                f"with the LoRA {r['lora_loss']:.4f}")
    print(f"lora file:   {r['lora']}")
    print(f"loss curve:  {r['loss_plot']}")
    print(f"before/after grid: {r['grid']}")
    print(f"prompt snippet: {r['snippet']}")
    output.note(NEXT_STEPS)
