"""`lora resume`: continue a run exactly where it stopped (or extend a finished one)."""

from __future__ import annotations

import functools
import sys

import typer

from loracli.ui import output
from loracli.ui.options import (AccelerateConfigOpt, IpOpt, JsonOpt, MachinesOpt, PortOpt,
                                ProcessesOpt, RankOpt, RunArg, WaitOpt)


def resume(
    run: RunArg,
    steps: int = typer.Option(0, "--steps", min=0, help="Train N more steps than planned."),
    until_step: int = typer.Option(0, "--until-step", min=0, help="Train until step N."),
    processes: ProcessesOpt = None,
    num_machines: MachinesOpt = None,
    machine_rank: RankOpt = None,
    main_process_ip: IpOpt = None,
    main_process_port: PortOpt = None,
    accelerate_config: AccelerateConfigOpt = None,
    wait: WaitOpt = False,
    json: JsonOpt = False,
) -> None:
    """Continue a run from its newest complete checkpoint: same batches, same RNG, same result."""
    from loracli.training import jobs
    from loracli.ui import trainview

    machines = jobs.Machines(num_machines, machine_rank, main_process_ip, main_process_port,
                             accelerate_config)
    with jobs.for_resume(run, processes, steps, until_step, machines, wait,
                         on_wait=output.note) as job:
        where = job.where
        step = f"from step {job.start_step}" if job.start_step else \
            "from the start (no checkpoint yet)"
        output.note(f"resuming {job.run_dir} {step}" + (
            f" as machine {where.machine_rank} of {where.machines}" if where.machines > 1 else ""))
        result, seconds = trainview.watch(functools.partial(jobs.train, job),
                                          output.is_terminal(sys.stderr), job.processes)
    sys.exit(trainview.report(result, seconds, run, json, where))  # 130: stopped, saved
