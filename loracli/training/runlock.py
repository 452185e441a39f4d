"""One trainer per run: an operating-system lock beside the run folder, and who holds it.

`lora train` and `lora resume` hold `output/.NAME.lock` while they start (or resume) the run in
`output/NAME` and train it; a second one is refused (`BusyError`, exit 2) or, with `--wait`, queues.
The lock is `flock(2)`: the kernel drops it when its holder dies, even by SIGKILL or a power cut,
so a lock is never stale. `output/.NAME.lock.json` says who holds it (PID, host, since when, the
command), for the refusal; it is only read while the lock is held, so a dead holder's leftover
file misleads nobody.

On several machines, machine 0 holds the run's lock (it creates or resumes the run) and machine
r > 0 holds `output/.NAME.machine-R.lock`: every machine of one job trains, while an unrelated
second `lora train` of the same run, or a second machine claiming the same rank, is refused.

Training processes under `accelerate launch` run in sessions of their own and can outlive a
killed `lora train`: each holds `output/.NAME.workers` shared (`join`), and machine 0 takes the
run only when no such process is left.

Why beside the folder and not inside it: `--restart` moves the run folder aside, and a new run
starts at the same path; the lock belongs to the path, and is taken before the folder exists.
On NFS, Linux maps flock to NFS locks (NFSv4, or v3 with lockd): every machine sees them, and the
server drops a dead client's lock when its lease ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli import atomic
from loracli.errors import BusyError, LoraError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock's msvcrt lock, no fd inheritance
    fcntl = None


def lock_path(run_dir: Path, machine_rank: int = 0) -> Path:
    """`output/.NAME.lock` for machine 0 (and one machine), `output/.NAME.machine-R.lock` else."""
    run_dir = Path(run_dir).expanduser().resolve()
    suffix = ".lock" if machine_rank == 0 else f".machine-{machine_rank}.lock"
    return run_dir.parent / f".{run_dir.name}{suffix}"


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str
    command: str = ""

    def describe(self) -> str:
        text = f"PID {self.pid} on {self.host} (since {self.since})"
        if self.host == socket.gethostname() and not _alive(self.pid):
            text += "; that process has exited, but training processes it started still run"
        return text


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def holder(run_dir: Path, machine_rank: int = 0) -> Holder | None:
    """Who last took the lock (read it only while the lock is held: then it is the holder)."""
    path = Path(f"{lock_path(run_dir, machine_rank)}.json")
    try:
        data = json.loads(path.read_text("utf-8"))
        return Holder(int(data["pid"]), str(data["host"]), str(data["since"]),
                      str(data.get("command", "")))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class RunLock:
    """A held run lock; `fds` are the descriptors a child process inherits to keep it held."""

    def __init__(self, path: Path, handle):
        self.path, self._handle = path, handle

    @property
    def fds(self) -> tuple[int, ...]:
        return (self._handle,) if isinstance(self._handle, int) else ()

    def release(self) -> None:
        if self._handle is None:
            return
        if isinstance(self._handle, int):
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
        else:
            self._handle.release()
        self._handle = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(path: Path, block: bool, shared: bool = False):
    """The handle of the held lock, or None when another process holds it (and not `block`)."""
    if fcntl is None:  # pragma: no cover
        from filelock import FileLock, Timeout

        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=-1 if block else 0)
        except Timeout:
            return None
        return lock
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                    | (0 if block else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _take(path: Path, wait: bool, on_wait, refusal: Callable[[], BusyError]):
    handle = _try_lock(path, block=False)
    if handle is None:
        error = refusal()
        if not wait:
            raise error
        if on_wait:
            on_wait(f"waiting: {error.message}")
        handle = _try_lock(path, block=True)
    return handle


def _workers_path(run_dir: Path) -> Path:
    return lock_path(run_dir).with_suffix(".workers")


def acquire(run_dir: Path, machine_rank: int = 0, wait: bool = False, command: str = "",
            on_wait: Callable[[str], None] | None = None) -> RunLock:
    """Take the run's lock (machine 0) or this machine's place in it (machine r > 0).

    Busy: raise `BusyError` naming the holder, or with `wait`, say so through `on_wait` and
    block until it is free. `command` is how this trainer was started (for the holder file and
    the hint, which adds `--wait` to it). Machine 0 also waits for (or refuses) training
    processes that outlived a killed trainer of the run (`join`).
    """
    run_dir = Path(run_dir).expanduser().resolve()
    path = lock_path(run_dir, machine_rank)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as e:
        raise LoraError(f"cannot write the run's lock {path}: {e.strerror}",
                        "choose a folder you can write to, e.g. --set "
                        "train.output_dir=./output/{profile}") from None
    queue = f"queue behind it: `{command} --wait`" if command else "add --wait to queue"

    def busy() -> BusyError:
        who = holder(run_dir, machine_rank)
        what = (f"{run_dir} is already training" if machine_rank == 0 else
                f"machine {machine_rank} of the run in {run_dir} is already training")
        where = f"in {who.describe()}" if who else "(its holder is still writing who it is)"
        hint = queue
        if machine_rank or (who and who.host != socket.gethostname()):
            hint = ("on a machine of a multi-machine job, give each machine its own "
                    "--machine-rank (0 for the main machine); or " + queue)
        return BusyError(f"{what} {where}", f"let it finish, or {hint}")

    def orphans() -> BusyError:
        who = holder(run_dir, 0)
        by = f" (started by PID {who.pid} on {who.host}, which is gone)" if who else ""
        return BusyError(f"training processes of a killed trainer of {run_dir} still run{by}",
                         "they save and stop after their current step; then run the command "
                         f"again, or {queue}")

    handle = _take(path, wait, on_wait, busy)
    lock = RunLock(path, handle)
    if machine_rank == 0:
        try:
            RunLock(path, _take(_workers_path(run_dir), wait, on_wait, orphans)).release()
        except BaseException:
            lock.release()
            raise
    info = Path(f"{path}.json")
    atomic.write_json(info, {
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run": str(run_dir), "machine_rank": machine_rank})
    with contextlib.suppress(OSError):
        info.chmod(0o644)  # teammates sharing the run folder may read who holds it
    return lock


def join(run_dir: Path) -> RunLock:
    """In each training process, for its lifetime: a shared hold that machine 0's next trainer
    sees, so processes that outlive their killed launcher are never trained over."""
    path = _workers_path(Path(run_dir).expanduser().resolve())
    if fcntl is None:  # pragma: no cover - no shared locks there: the launcher's lock must do
        return RunLock(path, None)
    return RunLock(path, _try_lock(path, block=True, shared=True))


@contextlib.contextmanager
def hold(run_dir: Path, machine_rank: int = 0, wait: bool = False, command: str = "",
         on_wait: Callable[[str], None] | None = None):
    """`acquire` for the length of a `with` block."""
    lock = acquire(run_dir, machine_rank, wait, command, on_wait)
    try:
        yield lock
    finally:
        lock.release()
