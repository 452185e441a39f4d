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


def run_with_progress(run_dir: Path, processes, extra_steps: int = 0, until_step: int = 0,
                      keep_fds: tuple = ()):
    """Train with a rich display on a terminal, plain lines otherwise; Ctrl+C saves and stops."""
    from loracli import launch, training

    stop = training.StopFlag()
    one = processes <= 1 if isinstance(processes, int) else processes.world_size <= 1
    live = one and output.is_terminal(sys.stderr)
    reporter = RichProgress() if live else None
    with stop.installed(output.note), reporter or contextlib.nullcontext():
        return launch.train(run_dir, processes, on_step=reporter or launch.plain_progress(),
                            on_warning=output.warn, stop=stop, extra_steps=extra_steps,
                            until_step=until_step, keep_fds=keep_fds)


def report(result, as_json: bool, run_arg: str, where=None) -> None:
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

    data = result.to_dict()
    if where is not None:
        data["launch"] = where.to_dict()
    output.emit(data, as_json, render)
    if result.status == "interrupted":
        raise typer.Exit(130)


# Several machines: accelerate's own names; each machine runs the same command.
MachinesOpt = typer.Option(None, "--num-machines", min=1,
                           help="Machines training together (--processes is per machine).")
RankOpt = typer.Option(None, "--machine-rank", min=0,
                       help="This machine's rank; 0 is the main one.")
IpOpt = typer.Option(None, "--main-process-ip", help="Machine 0's address, seen by every machine.")
PortOpt = typer.Option(None, "--main-process-port", min=0, max=65535,
                       help="Port on machine 0 where the machines meet (default 29500).")
ConfigOpt = typer.Option(None, "--accelerate-config", help="An accelerate config file.")
WaitOpt = typer.Option(False, "--wait", help="Queue behind a trainer of the same run, not exit 2.")


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
    num_machines: Optional[int] = MachinesOpt,
    machine_rank: Optional[int] = RankOpt,
    main_process_ip: Optional[str] = IpOpt,
    main_process_port: Optional[int] = PortOpt,
    accelerate_config: Optional[str] = ConfigOpt,
    wait: bool = WaitOpt,
    json: bool = JsonOpt,
) -> None:
    """Train a LoRA; re-running it continues an interrupted run."""
    from loracli import launch, runlock, runs

    overrides = list(set_ or []) + ([f"train.processes={processes}"] if processes else []) \
        + ([f"train.num_machines={num_machines}"] if num_machines else [])
    prof = profiles.load(str(config) if config else (profile or "default"), overrides)
    invocation = f"lora train --config {config}" if config else f"lora train --profile {prof.name}"
    where = launch.layout(prof.train, processes, num_machines, machine_rank, main_process_ip,
                          main_process_port, accelerate_config)
    target = runs.default_output_dir(prof.name, prof.train.output_dir)
    with runlock.hold(target, where.machine_rank, wait, invocation + where.flags(),
                      output.note) as lock:
        if where.machine_rank == 0:  # machine 0 creates or resumes the run; the others join it
            run_dir, resumed = runs.start(prof, restart=restart, on_warning=output.warn,
                                          invocation=invocation)
            if resumed:
                output.note(f"continuing the run in {run_dir} (same profile)")
        else:
            run_dir = target.resolve()
            output.note(f"joining the run in {run_dir} as machine {where.machine_rank} of "
                        f"{where.machines}: waiting for machine 0 at {where.main_process_ip}:"
                        f"{where.main_process_port}, which shows the progress")
        report(run_with_progress(run_dir, where, keep_fds=lock.fds), json, str(run_dir), where)
