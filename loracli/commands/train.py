"""`lora train`: a profile and a folder of images in, LoRA checkpoints out."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import List, Optional

import typer

from loracli import output, profiles

JsonOpt = typer.Option(False, "--json", help="Print one JSON document on stdout.")


class RichProgress:
    """A live display on a terminal: step/total, epoch, loss, lr, it/s, img/s, ETA, memory."""

    def __init__(self):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(
            BarColumn(bar_width=12), MofNCompleteColumn(),
            TextColumn("ep {task.fields[epoch]} loss {task.fields[loss]} lr {task.fields[lr]} "
                       "{task.fields[speed]} {task.fields[mem]}"),
            TimeRemainingColumn(), console=output.console(stderr=True), transient=False)
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc):
        self.progress.stop()

    def __call__(self, m: dict) -> None:
        fields = {"epoch": f"{m['epoch']:.2f}", "loss": f"{m['loss_smooth']:.4f}",
                  "lr": f"{m['lr']:.1e}",
                  "speed": f"{1 / m['seconds']:.2f}it/s {m['images_per_s']:.1f}img/s",
                  "mem": f"{m['memory_mib']:.0f} MiB"}
        if self.task is None:
            self.task = self.progress.add_task("train", total=m["max_steps"],
                                               completed=m["step"] - 1, **fields)
        self.progress.update(self.task, completed=m["step"], total=m["max_steps"], **fields)
        if "checkpoint" in m:
            self.progress.console.print(f"saved {m['checkpoint']}")


def run_with_progress(run_dir: Path, processes: int, extra_steps: int = 0, until_step: int = 0):
    """Train with a rich display on a terminal, plain lines otherwise; Ctrl+C saves and stops."""
    from loracli import launch, training

    stop = training.StopFlag()
    live = processes <= 1 and output.is_terminal(sys.stderr)
    reporter = RichProgress() if live else None
    with stop.installed(output.note), reporter or contextlib.nullcontext():
        return launch.train(run_dir, processes, on_step=reporter or launch.plain_progress(),
                            on_warning=output.warn, stop=stop, extra_steps=extra_steps,
                            until_step=until_step)


def report(result, as_json: bool, run_arg: str) -> None:
    """Print the outcome; exit 130 when Ctrl+C stopped the run (after it saved)."""
    def render(r: dict) -> None:
        if r["status"] == "already-finished":
            output.note(f"{r['run']} is finished (step {r['step']}/{r['max_steps']}); "
                        f"train longer with `lora resume {run_arg} --steps 500`, "
                        f"or export it with `lora export {run_arg}`")
        elif r["status"] == "interrupted":
            output.note(f"stopped at step {r['step']}/{r['max_steps']}; "
                        f"continue with `lora resume {run_arg}`")
        else:
            output.note(f"finished {r['max_steps']} steps; export with `lora export {run_arg}`")
        print(r["checkpoint"] or r["run"])

    output.emit(result.to_dict(), as_json, render)
    if result.status == "interrupted":
        raise typer.Exit(130)


def train(
    profile: Optional[str] = typer.Option(None, "--profile", "-p", help="Profile name or file.",
                                          autocompletion=profiles.complete_name),
    config: Optional[Path] = typer.Option(None, "--config", "-c",
                                          help="A profile file (TOML/YAML)."),
    set_: Optional[List[str]] = typer.Option(None, "--set",
                                             help="Override a key: SECTION.KEY=VALUE."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1,
                                            help="Training processes (GPUs) via accelerate."),
    restart: bool = typer.Option(False, "--restart",
                                 help="Start a new run even if one exists (the old one is kept)."),
    json: bool = JsonOpt,
) -> None:
    """Train a LoRA; re-running it continues an interrupted run."""
    from loracli import runs

    overrides = list(set_ or []) + ([f"train.processes={processes}"] if processes else [])
    prof = profiles.load(str(config) if config else (profile or "default"), overrides)
    invocation = f"lora train --config {config}" if config else f"lora train --profile {prof.name}"
    run_dir, resumed = runs.start(prof, restart=restart, on_warning=output.warn,
                                      invocation=invocation)
    if resumed:
        output.note(f"continuing the run in {run_dir} (same profile)")
    n = processes or runs.load_profile(run_dir).train.processes
    report(run_with_progress(run_dir, n), json, str(run_dir))
