"""`lora resume`: continue a run exactly where it stopped (or extend a finished one)."""

from __future__ import annotations

from typing import Optional

import typer

from loracli import output


def resume(
    run: str = typer.Argument(..., help="The run's output folder, or its profile name."),
    steps: int = typer.Option(0, "--steps", min=0, help="Train N more steps than planned."),
    until_step: int = typer.Option(0, "--until-step", min=0, help="Train until step N."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1,
                                            help="Processes; must give the run's global batch."),
    json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Continue a run from its newest complete checkpoint: same batches, same RNG, same result."""
    from loracli import runs
    from loracli.commands.train import report, run_with_progress

    run_dir = runs.resolve(run)
    n = processes or runs.load_profile(run_dir).train.processes
    output.note(f"resuming {run_dir}")
    report(run_with_progress(run_dir, n, extra_steps=steps, until_step=until_step), json, run)
