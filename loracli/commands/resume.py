"""`lora resume`: continue a run exactly where it stopped (or extend a finished one)."""

from __future__ import annotations

from typing import Optional

import typer

from loracli import output
from loracli.commands.train import (ConfigOpt, IpOpt, MachinesOpt, PortOpt, RankOpt, WaitOpt,
                                    report, run_with_progress)


def resume(
    run: str = typer.Argument(..., help="The run's output folder, or its profile name."),
    steps: int = typer.Option(0, "--steps", min=0, help="Train N more steps than planned."),
    until_step: int = typer.Option(0, "--until-step", min=0, help="Train until step N."),
    processes: Optional[int] = typer.Option(None, "--processes", min=1,
                                            help="Processes; must give the run's global batch."),
    num_machines: Optional[int] = MachinesOpt,
    machine_rank: Optional[int] = RankOpt,
    main_process_ip: Optional[str] = IpOpt,
    main_process_port: Optional[int] = PortOpt,
    accelerate_config: Optional[str] = ConfigOpt,
    wait: bool = WaitOpt,
    json: bool = typer.Option(False, "--json", help="Print one JSON document on stdout."),
) -> None:
    """Continue a run from its newest complete checkpoint: same batches, same RNG, same result."""
    from loracli import launch, runlock, runs

    run_dir = runs.resolve(run)
    where = launch.layout(runs.load_profile(run_dir).train, processes, num_machines,
                          machine_rank, main_process_ip, main_process_port, accelerate_config)
    with runlock.hold(run_dir, where.machine_rank, wait, f"lora resume {run}{where.flags()}",
                      output.note) as lock:
        output.note(f"resuming {run_dir}" + (f" as machine {where.machine_rank} of "
                                            f"{where.machines}" if where.machines > 1 else ""))
        report(run_with_progress(run_dir, where, extra_steps=steps, until_step=until_step,
                                 keep_fds=lock.fds), json, run, where)
