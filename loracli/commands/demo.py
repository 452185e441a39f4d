"""`lora demo`: the main job, end to end, on the embedded tiny model (no network, no GPU)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from loracli.ui import output
from loracli.ui.options import JsonOpt

NEXT_STEPS = """\
The base was the tiny 64 px model (trained briefly on squares and triangles, never discs), so
pictures are 8x8 colour mosaics; the grid's last row is the LoRA's doing. For real work:
  lora fetch sd15 --mirror hf-mirror           # SD 1.5 through a mirror, resumable and verified
  lora caption data/my_style --prefix "sks style"
  lora profile new my-style --from style       # then `lora profile edit my-style`
  lora train --profile my-style                # Ctrl+C saves; `lora resume my-style` continues
  lora export my-style                         # -> <lora:my-style:0.8> in WebUI / ComfyUI"""


NEXT_STEPS_LLM = """\
The base was a tiny random Llama, so its own answers are noise; the pirate is the LoRA's doing.
For real work:
  lora fetch qwen2.5-0.5b-instruct             # a small chat model (also qwen3-0.6b, llama-3.2-1b-instruct)
  lora profile new my-chat --from chat         # then point [data] dir at your .jsonl
  lora train --profile my-chat                 # Ctrl+C saves; `lora resume my-chat` continues
  lora export my-chat --format gguf            # -> llama.cpp / Ollama ADAPTER; --format merged for vLLM"""


def demo(
    out: Path = typer.Option(Path("lora-demo"), "--output", "-o",
                             help="Folder for the demo's data, run and pictures."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1,
                                        help="Training steps (default: the demo profile's 600)."),
    llm: bool = typer.Option(False, "--llm", help="The language-model half: a tiny Llama learns "
                                                  "to answer like a pirate (about a minute)."),
    json: JsonOpt = False,
) -> None:
    """The whole job on a tiny offline model: fetch, data, train, export, before/after grid.

    Ctrl+C saves and stops (exit 130); running the same command again continues the run and
    ends with the grid.
    """
    from loracli.training import loop as training
    from loracli.ui import trainview

    if llm:
        from loracli.llm import demo as demo_lib
    else:
        from loracli import demo as demo_lib

    stop = training.StopFlag()
    shown = trainview.view(output.is_terminal(sys.stderr), every=20)
    with stop.installed(output.note), shown:
        result = demo_lib.run(out, on_step=shown.on_step, on_stage=shown.say,
                              on_warning=output.warn, stop=stop, max_steps=steps,
                              on_start=shown.on_start, on_status=shown.on_status)
    again = f"lora demo --output {out}" + (f" --steps {steps}" if steps else "") + \
        (" --llm" if llm else "")
    stopped = result.status == "interrupted"
    document = {**result.to_dict(), "next": again if stopped else None}
    if stopped:
        output.note(f"demo stopped at step {result.steps}; `{again}` continues it from there "
                    "and ends with the before/after grid")
    output.emit(document, json, (lambda r: None) if stopped else _render_llm if llm else _render)
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


def _render_llm(r: dict) -> None:
    output.note(f"held-out loss on unseen questions: base {r['base_loss']:.4f} -> "
                f"with the LoRA {r['lora_loss']:.4f}")
    for a in r["answers"]:
        print(f"Q: {a['prompt']}\n   base: {a['base'][:60]!r}\n   LoRA: {a['lora']!r}")
    print(f"peft adapter: {r['peft']}")
    print(f"GGUF adapter: {r['gguf']}")
    output.note(NEXT_STEPS_LLM)
