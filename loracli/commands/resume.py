"""`lora resume`: continue a run exactly where it stopped (or extend a finished one)."""

from __future__ import annotations

import sys

import typer

from loracli import output
from loracli.options import JsonOpt, ProcessesOpt, RunArg


def resume(
    run: RunArg,
    steps: int = typer.Option(0, "--steps", min=0, help="Train N more steps than planned."),
    until_step: int = typer.Option(0, "--until-step", min=0, help="Train until step N."),
    processes: ProcessesOpt = None,
    json: JsonOpt = False,
) -> None:
    """Continue a run from its newest complete checkpoint: same batches, same RNG, same result."""
    from loracli import jobs, trainview

    job = jobs.for_resume(run, processes, steps, until_step)
    where = f"from step {job.start_step}" if job.start_step else "from the start (no checkpoint yet)"
    output.note(f"resuming {job.run_dir} {where}")
    result, seconds = trainview.train(job, live=output.is_terminal(sys.stderr))
    sys.exit(trainview.report(result, seconds, run, json))  # 130: stopped, saved
