"""One training process under `accelerate launch`: check the world, then train.

Before anything is loaded, each process checks that accelerate started the world that was asked
for (it silently falls back to fewer processes in some setups) and, on several machines, that
every machine sees what machine 0 writes in the run folder; all processes agree on the verdict,
so none trains alone. Only the main process writes checkpoints and logs (`training.run`); every
process waits for the others before it exits, and holds the run (`runlock.join`) until it does.
A process whose launcher was killed saves and stops after its current step.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError
from loracli.training.launch import INTERRUPTED, Layout, plain_progress

SHARED_TIMEOUT = 120.0  # seconds a machine waits to see machine 0's file (NFS caches lookups)


def check_world(where: Layout, state) -> None:
    """Stop when accelerate started another world than `where` asks for (all ranks agree)."""
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    got, mode = state.num_processes, state.distributed_type
    local = int(os.environ.get("LOCAL_WORLD_SIZE", got))
    machine = int(os.environ.get("GROUP_RANK", where.machine_rank))
    problem = None
    if got != where.world_size or (where.world_size > 1 and mode == DistributedType.NO):
        asked = f"{where.world_size} training processes"
        if where.machines > 1:
            asked = f"{where.describe()} = {asked}"
        problem = f"{asked} were asked for, but accelerate started {got} ({mode.value})"
    elif local != where.processes:
        problem = (f"machine {where.machine_rank} runs {local} processes; "
                   f"{where.processes} per machine were asked for")
    elif machine != where.machine_rank:
        problem = f"machine {where.machine_rank} joined as machine {machine}"
    if got > 1 and dist.is_initialized():
        problems = [None] * got
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    if problem:
        hints = []
        if where.accelerate_config:
            hints.append(f"check distributed_type, num_processes and num_machines in "
                         f"{where.accelerate_config} (with distributed_type NO accelerate starts "
                         "one process), or leave out --accelerate-config")
        if where.machines > 1:
            hints.append("run the same command on every machine, with the same --processes and "
                         "--num-machines and each machine's own --machine-rank")
        elif not hints:
            hints.append("run `lora train` itself, not under torchrun or srun --ntasks>1, and "
                         "with no WORLD_SIZE, RANK or LOCAL_RANK set in the environment")
        hint = "; ".join(hints)
        raise LoraError(problem, hint)


def check_shared(run_dir: Path, where: Layout, state, timeout: float | None = None) -> None:
    """Stop unless every machine sees, in the run folder, a file machine 0 wrote just now."""
    import secrets
    import time

    import torch.distributed as dist

    from loracli import atomic

    if timeout is None:
        timeout = float(os.environ.get("LORA_SHARED_TIMEOUT", SHARED_TIMEOUT))
    token = [secrets.token_hex(16) if state.is_main_process else None]
    dist.broadcast_object_list(token, src=0)
    probe = Path(run_dir) / f".shared-{token[0][:8]}"
    if state.is_main_process:
        atomic.write_text(probe, token[0])
    seen, end = state.is_main_process, time.monotonic() + timeout
    while not seen and time.monotonic() < end:
        try:
            seen = probe.read_text("utf-8") == token[0]
        except OSError:
            pass
        if not seen:
            time.sleep(0.2)
    views = [None] * state.num_processes
    dist.all_gather_object(views, (seen, where.machine_rank, socket.gethostname()))
    state.wait_for_everyone()
    if state.is_main_process:
        probe.unlink(missing_ok=True)
    blind = sorted({f"machine {r} ({host})" for ok, r, host in views if not ok})
    if blind:
        raise LoraError(f"the run folder {run_dir} is not on storage every machine sees: "
                        f"{', '.join(blind)} did not see machine 0's file there within "
                        f"{timeout:.0f} s",
                        "put train.output_dir on a shared filesystem (NFS, Lustre, …) mounted at "
                        "the same path on every machine, e.g. --set "
                        "train.output_dir=/shared/runs/{profile}; then run the command again")


def main(argv: list[str] | None = None) -> int:
    """One process under `accelerate launch`; the local main one reports on stderr."""
    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # see cli.quiet_third_party_notices
    import torch
    from accelerate import PartialState

    from loracli import atomic
    from loracli.training import loop as training
    from loracli.training import runlock
    from loracli.ui import output

    parser = argparse.ArgumentParser(prog="python -m loracli.training.worker")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--extra-steps", type=int, default=0)
    parser.add_argument("--until-step", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--num-machines", type=int, default=1)
    parser.add_argument("--machine-rank", type=int, default=0)
    parser.add_argument("--accelerate-config", type=Path)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    where = Layout(args.processes, args.num_machines, args.machine_rank,
                   accelerate_config=args.accelerate_config)
    local_main = os.environ.get("LOCAL_RANK", "0") == "0"
    stop = training.StopFlag()
    stop.install(output.note if local_main else None, abort_on_second=False)
    _stop_when_orphaned(stop, output.note if local_main else None)
    # the same state the trainer's Accelerator will share: the process group starts here
    state = PartialState(cpu=not torch.cuda.is_available())
    with runlock.join(args.run_dir):  # held until this process is done with the run
        try:
            check_world(where, state)
            if where.machines > 1:
                check_shared(args.run_dir, where, state)
            result = training.run(args.run_dir,
                                  on_step=plain_progress() if local_main else None,
                                  on_warning=output.warn, stop=stop,
                                  extra_steps=args.extra_steps, until_step=args.until_step)
            state.wait_for_everyone()  # no machine leaves while another still saves
            if not state.is_main_process and result.status != "already-finished":
                result.checkpoint = _saved(args.run_dir, result.step)  # machine 0 wrote it
            data, code = result.to_dict(), INTERRUPTED if result.status == "interrupted" else 0
        except LoraError as e:
            data, code = e.to_dict(), 1
    if local_main and args.result:
        atomic.write_json(args.result, data)
    if state.num_processes > 1 and code != 1:
        torch.distributed.destroy_process_group()
    return code


def _saved(run_dir: Path, step: int) -> Path | None:
    from loracli.training import runs

    path = runs.checkpoint_dir(run_dir, step)
    return path if (path / runs.MARKER).is_file() else None


def _stop_when_orphaned(stop, notify: Callable[[str], None] | None) -> None:
    """A killed launcher leaves its workers running (they have sessions of their own): they
    then save and stop after the current step, as on Ctrl+C, instead of training unseen."""
    import threading
    import time

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        stop.requested = True
        if notify:
            notify("the launcher is gone: stopping after this step and saving a checkpoint")

    threading.Thread(target=watch, name="lora-orphan-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
