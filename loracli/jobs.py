"""What `lora train` and `lora resume` decide before training: which run folder, new or continued,
from which step, with how many processes; and the call that trains it.

`for_train` is the start-or-resume policy: a profile whose run exists with the same settings is
continued, `--restart` starts a new run beside it, a changed profile is refused with the command
that either continues or restarts (`runs.start`). `for_resume` finds an existing run. `preview`
reads the run folder for the header the trainer's `on_start` will confirm; `train` runs it.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError


@dataclass(frozen=True)
class Job:
    run_dir: Path
    processes: int
    resumed: bool        # an existing run is continued
    start_step: int      # the newest complete checkpoint's step; 0 for a new run
    run_arg: str         # how hints name this run: `lora resume RUN_ARG`
    extra_steps: int = 0
    until_step: int = 0


def newest_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint (the one a resume starts from); 0 if none."""
    from loracli import runs

    complete = [c for c in runs.checkpoints(run_dir) if c.complete]
    return complete[-1].step if complete else 0


def for_train(profile: str | None = None, config: Path | None = None,
              overrides: list[str] | tuple = (), processes: int | None = None,
              restart: bool = False, on_warning: Callable[[str], None] | None = None) -> Job:
    """The run `lora train` trains: a new one, or the same profile's interrupted one."""
    from loracli import profiles, runs

    overrides = list(overrides) + ([f"train.processes={processes}"] if processes else [])
    if config is not None:
        prof = profiles.load_file(config, overrides)
        invocation = f"lora train --config {config}"
    else:
        prof = profiles.load(profile or "default", overrides)
        invocation = f"lora train --profile {prof.name}"
    run_dir, resumed = runs.start(prof, restart=restart, on_warning=on_warning,
                                  invocation=invocation)
    n = processes or runs.load_profile(run_dir).train.processes
    return Job(run_dir, n, resumed, newest_step(run_dir) if resumed else 0, str(run_dir))


def for_resume(run: str, processes: int | None = None, extra_steps: int = 0,
               until_step: int = 0) -> Job:
    """The run `lora resume RUN` continues (a folder, or a profile's output folder)."""
    from loracli import runs

    run_dir = runs.resolve(run)
    n = processes or runs.load_profile(run_dir).train.processes
    return Job(run_dir, n, True, newest_step(run_dir), run, extra_steps, until_step)


def preview(job: Job) -> dict:
    """The header facts as far as the run folder knows them (keys of the trainer's `on_start`)."""
    from loracli import runs

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
    `preview` before training begins.
    """
    from loracli import launch

    accepted = inspect.signature(launch.train).parameters
    extra = {}
    if on_start is not None:
        if "on_start" in accepted:
            extra["on_start"] = on_start
        else:
            on_start(preview(job))
    if on_status is not None and "on_status" in accepted:
        extra["on_status"] = on_status
    return launch.train(job.run_dir, job.processes, on_step=on_step, on_warning=on_warning,
                        stop=stop, extra_steps=job.extra_steps, until_step=job.until_step,
                        **extra)
