"""`lora train`: a profile and a folder of images in, LoRA checkpoints out."""

from __future__ import annotations

import functools
import sys

import typer

from loracli.ui import output
from loracli.ui.options import (AccelerateConfigOpt, ConfigOpt, IpOpt, JsonOpt, MachinesOpt,
                                PortOpt, ProcessesOpt, ProfileOpt, RankOpt, SetOpt, WaitOpt)


def train(
    profile: ProfileOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    processes: ProcessesOpt = None,
    restart: bool = typer.Option(False, "--restart",
                                 help="Start a new run even if one exists (the old one is kept)."),
    num_machines: MachinesOpt = None,
    machine_rank: RankOpt = None,
    main_process_ip: IpOpt = None,
    main_process_port: PortOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
    wait: WaitOpt = False,
    json: JsonOpt = False,
) -> None:
    """Train a LoRA; re-running it continues an interrupted run."""
    from loracli.training import jobs
    from loracli.ui import trainview

    machines = jobs.Machines(num_machines, machine_rank, main_process_ip, main_process_port,
                             accelerate_config)
    with jobs.for_train(profile, config, set_ or [], processes, restart, machines, wait,
                        on_warning=output.warn, on_wait=output.note) as job:
        where = job.where
        if job.joining:
            output.note(f"joining the run in {job.run_dir} as machine {where.machine_rank} of "
                        f"{where.machines}: waiting for machine 0 at {where.main_process_ip}:"
                        f"{where.main_process_port}, which shows the progress")
        elif job.resumed:
            output.note(f"continuing the run in {job.run_dir} from step {job.start_step} "
                        "(same profile)")
        result, seconds = trainview.watch(functools.partial(jobs.train, job),
                                          output.is_terminal(sys.stderr), job.processes)
    sys.exit(trainview.report(result, seconds, job.run_arg, json, where))  # 130: stopped, saved
