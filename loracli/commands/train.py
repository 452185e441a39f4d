"""`lora train`: a profile and a folder of images in, LoRA checkpoints out."""

from __future__ import annotations

import sys

import typer

from loracli import output
from loracli.options import ConfigOpt, JsonOpt, ProcessesOpt, ProfileOpt, SetOpt


def train(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    processes: ProcessesOpt = None,
    restart: bool = typer.Option(False, "--restart",
                                 help="Start a new run even if one exists (the old one is kept)."),
    json: JsonOpt = False,
) -> None:
    """Train a LoRA; re-running it continues an interrupted run."""
    from loracli import jobs, trainview

    job = jobs.for_train(profile, config, set_ or [], processes, restart, on_warning=output.warn)
    if job.resumed:
        output.note(f"continuing the run in {job.run_dir} from step {job.start_step} "
                    "(same profile)")
    result, seconds = trainview.train(job, live=output.is_terminal(sys.stderr))
    sys.exit(trainview.report(result, seconds, job.run_arg, json))  # 130: stopped, saved
