"""What `lora train` and `lora resume` decide before training: which run folder, new or continued,
from which step, on which machines and processes; and the call that trains it.

`for_train` is the start-or-resume policy: a profile whose run exists with the same settings is
continued, `--restart` starts a new run beside it, a changed profile is refused with the command
that either continues or restarts (`runs.start`); machine r > 0 of several joins machine 0's run.
`for_resume` finds an existing run. Both hold the run's lock (`runlock`) for the `with` block, so a
second trainer of the same run is refused (exit 2) or queues (`wait`). `preview` reads the run
folder for the header that the trainer's `on_start` confirms; `train` runs the job.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from loracli.errors import LoraError


@dataclass(frozen=True)
class Machines:
    """The several-machines options as given on the command line (None: from the profile)."""

    num_machines: int | None = None
    machine_rank: int | None = None
    main_process_ip: str | None = None
    main_process_port: int | None = None
    accelerate_config: str | None = None


@dataclass(frozen=True)
class Job:
    run_dir: Path
    where: object            # launch.Layout: processes on each of the machines
    resumed: bool            # an existing run is continued (or, on machine r > 0, joined)
    start_step: int          # the newest complete checkpoint's step; 0 for a new run
    run_arg: str             # how hints name this run: `lora resume RUN_ARG`
    extra_steps: int = 0
    until_step: int = 0
    keep_fds: tuple = field(default=())  # the run lock, inherited by the launcher
    joining: bool = False    # machine r > 0: machine 0 writes the run and shows the progress

    @property
    def processes(self) -> int:
        return self.where.world_size


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (the one a resume starts from); 0 if none."""
    from loracli.training import runs

    complete = [c for c in runs.checkpoints(run_dir) if c.complete]
    return complete[-1].step if complete else 0


@contextlib.contextmanager
def for_train(profile: str | None = None, config: Path | None = None,
              overrides: list[str] | tuple = (), processes: int | None = None,
              restart: bool = False, machines: Machines = Machines(), wait: bool = False,
              on_warning: Callable[[str], None] | None = None,
              on_wait: Callable[[str], None] | None = None) -> Iterator[Job]:
    """The run `lora train` trains, a new one or the same profile's interrupted one, locked."""
    from loracli import profiles
    from loracli.training import launch, runlock, runs

    overrides = list(overrides) + ([f"train.processes={processes}"] if processes else []) \
        + ([f"train.num_machines={machines.num_machines}"] if machines.num_machines else [])
    if config is not None:
        prof = profiles.load_file(config, overrides)
        invocation = f"lora train --config {config}"
    else:
        prof = profiles.load(profile or "default", overrides)
        invocation = f"lora train --profile {prof.name}"
    where = launch.layout(prof.train, processes, machines.num_machines, machines.machine_rank,
                          machines.main_process_ip, machines.main_process_port,
                          machines.accelerate_config)
    target = runs.default_output_dir(prof.name, prof.train.output_dir)
    with runlock.hold(target, where.machine_rank, wait, invocation + where.flags(),
                      on_wait) as lock:
        if where.machine_rank == 0:  # machine 0 creates or resumes the run; the others join it
            run_dir, resumed = runs.start(prof, restart=restart, on_warning=on_warning,
                                          invocation=invocation)
            yield Job(run_dir, where, resumed, newest_step(run_dir) if resumed else 0,
                      str(run_dir), keep_fds=lock.fds)
        else:
            run_dir = target.resolve()
            yield Job(run_dir, where, True, 0, str(run_dir), keep_fds=lock.fds, joining=True)


@contextlib.contextmanager
def for_resume(run: str, processes: int | None = None, extra_steps: int = 0,
               until_step: int = 0, machines: Machines = Machines(), wait: bool = False,
               on_wait: Callable[[str], None] | None = None) -> Iterator[Job]:
    """The run `lora resume RUN` continues (a folder, or a profile's output folder), locked."""
    from loracli.training import launch, runlock, runs

    run_dir = runs.resolve(run)
    where = launch.layout(runs.load_profile(run_dir).train, processes, machines.num_machines,
                          machines.machine_rank, machines.main_process_ip,
                          machines.main_process_port, machines.accelerate_config)
    with runlock.hold(run_dir, where.machine_rank, wait, f"lora resume {run}{where.flags()}",
                      on_wait) as lock:
        yield Job(run_dir, where, True, newest_step(run_dir), run, extra_steps, until_step,
                  keep_fds=lock.fds, joining=where.machine_rank > 0)


def preview(job: Job) -> dict:
    """The header facts as far as the run folder knows them (keys of the trainer's `on_start`)."""
    from loracli.training import runs

    info = {"run": str(job.run_dir), "start_step": job.start_step, "resumed": job.resumed,
            "processes": job.processes}
    try:
        facts = runs.info(job.run_dir)
        profile = runs.load_profile(job.run_dir)
        data = json.loads((job.run_dir / "dataset.json").read_text("utf-8"))
    except (LoraError, OSError, ValueError):
        return info
    base = facts.get("base") or {}
    t = profile.train
    planned = t.max_steps
    if job.start_step:  # a checkpoint knows the plan it was saved under (--steps extend it)
        state = runs.checkpoint_dir(job.run_dir, job.start_step) / "state.json"
        try:
            planned = json.loads(state.read_text("utf-8")).get("max_steps") or planned
        except (OSError, ValueError):
            pass
    max_steps = job.until_step or ((planned or None) and planned + job.extra_steps)
    info.update(profile=facts.get("profile"), family=base.get("family"),
                base=base.get("model"), images=data.get("num_images"),
                resolution=data.get("resolution"), batch_size=t.batch_size,
                max_steps=max_steps or f"{t.epochs} epochs")
    return info


def train(job: Job, on_step: Callable[[dict], None] | None = None,
          on_warning: Callable[[str], None] | None = None, stop=None,
          on_start: Callable[[dict], None] | None = None,
          on_status: Callable[[str], None] | None = None):
    """Train `job` (one process here, more through accelerate); returns `training.Result`.

    `on_start`/`on_status` reach the trainer when it accepts them; otherwise `on_start` gets the
    `preview` before training begins (not on a machine that only joins).
    """
    from loracli.training import launch

    accepted = inspect.signature(launch.train).parameters
    extra = {}
    if on_start is not None:
        if "on_start" in accepted:
            extra["on_start"] = on_start
        elif not job.joining:
            on_start(preview(job))
    if on_status is not None and "on_status" in accepted:
        extra["on_status"] = on_status
    return launch.train(job.run_dir, job.where, on_step=on_step, on_warning=on_warning,
                        stop=stop, extra_steps=job.extra_steps, until_step=job.until_step,
                        keep_fds=job.keep_fds, **extra)
