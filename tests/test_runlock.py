"""One trainer per run: a second `lora train`/`lora resume` of a run is refused (exit 2, who holds
it) or queues with --wait; a lock whose holder was SIGKILLed never blocks; the machines of one
multi-machine job each take their own place."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading

import pytest
from train_fixtures import wait_for

from loracli import profiles
from loracli.errors import BusyError
from loracli.training import runlock

HOLDER = """
import sys
from loracli.training import runlock
lock = runlock.acquire(sys.argv[1], int(sys.argv[2]), command="lora train --profile held")
print("held", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding a run's lock until it is told to go (or killed)."""
    procs = []

    def start(run_dir, machine_rank=0):
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), str(machine_rank)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_second_trainer_is_refused_naming_the_holder(holder, tmp_path):
    run = tmp_path / "out" / "style"
    proc = holder(run)
    with pytest.raises(BusyError) as e:
        runlock.acquire(run, command="lora train --profile style")
    assert e.value.exit_code == 2
    assert f"{run} is already training in PID {proc.pid} on {socket.gethostname()}" \
        in e.value.message
    assert "`lora train --profile style --wait`" in e.value.hint
    assert not run.exists()  # the lock lives beside the run folder: --restart moves the folder


def _run_folder(run, data):
    """A run folder as `lora train` leaves it (what `lora resume` needs to find it)."""
    prof = profiles.parse({"model": {"base": "sd15"}, "data": {"dir": str(data)},
                           "train": {"output_dir": str(run)}}, name="style")
    run.mkdir(parents=True)
    (run / "profile.toml").write_text(prof.to_toml(), "utf-8")
    (run / "run.json").write_text(json.dumps({"profile": "style"}), "utf-8")


def test_train_and_resume_exit_2_while_another_trainer_holds_the_run(cli, holder, tmp_path):
    run = tmp_path / "out" / "style"
    _run_folder(run, tmp_path / "data")
    config = tmp_path / "style.toml"
    config.write_text(f'[model]\nbase = "sd15"\n[data]\ndir = "{tmp_path / "data"}"\n'
                      f'[train]\noutput_dir = "{run}"\n', "utf-8")
    proc = holder(run)
    train = cli("train", "--config", config, "--json")
    assert train.exit_code == 2
    assert f"already training in PID {proc.pid}" in train.stderr
    assert f"hint: let it finish, or queue behind it: `lora train --config {config} --wait`" \
        in train.stderr
    assert json.loads(train.stdout)["error"].startswith(f"{run} is already training")
    resume = cli("resume", str(run))
    assert resume.exit_code == 2
    assert f"already training in PID {proc.pid}" in resume.stderr
    assert f"`lora resume {run} --wait`" in resume.stderr


def test_a_run_folder_that_cannot_be_written_is_an_error_with_a_hint(cli, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    config = tmp_path / "style.toml"
    config.write_text(f'[data]\ndir = "{tmp_path}"\n[train]\noutput_dir = '
                      f'"{tmp_path / "file" / "run"}"\n', "utf-8")
    result = cli("train", "--config", config)
    assert result.exit_code == 1
    assert f"error: cannot write the run's lock {tmp_path / 'file' / '.run.lock'}" \
        in result.stderr
    assert "hint: choose a folder you can write to" in result.stderr


def test_wait_queues_until_the_holder_finishes(holder, tmp_path):
    run = tmp_path / "style"
    proc = holder(run)
    notes, got = [], []
    waiter = threading.Thread(target=lambda: got.append(
        runlock.acquire(run, wait=True, command="lora resume style", on_wait=notes.append)))
    waiter.start()
    assert wait_for(lambda: notes, 60)
    assert notes == [f"waiting: {run} is already training in PID {proc.pid} on "
                     f"{socket.gethostname()} (since {runlock.holder(run).since})"]
    assert waiter.is_alive() and not got  # still queued while the holder lives
    proc.stdin.write("go\n")
    proc.stdin.flush()
    waiter.join(60)
    assert got and runlock.holder(run).pid == _own_pid()
    assert runlock.holder(run).command == "lora resume style"
    got[0].release()


def _own_pid() -> int:
    import os

    return os.getpid()


def test_a_sigkilled_holders_lock_never_blocks(holder, tmp_path):
    run = tmp_path / "style"
    proc = holder(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with runlock.acquire(run, command="lora train --profile style"):  # no wait, no error
        assert runlock.holder(run).pid == _own_pid()
    with runlock.hold(run):  # released on leaving the block: free again at once
        pass


def test_machines_of_one_job_take_their_own_places_and_a_duplicate_rank_is_refused(
        holder, tmp_path):
    run = tmp_path / "style"
    holder(run, 0)  # machine 0 of a job
    with runlock.acquire(run, machine_rank=1, command="lora train --profile style"):
        with pytest.raises(BusyError) as e:
            runlock.acquire(run, machine_rank=1, command="lora train --profile style")
        assert f"machine 1 of the run in {run} is already training in PID {_own_pid()}" \
            in e.value.message
        assert "own --machine-rank" in e.value.hint
        with pytest.raises(BusyError, match="is already training in PID"):
            runlock.acquire(run)  # an unrelated second trainer: machine 0's place is taken
    assert runlock.lock_path(run, 1).name == ".style.machine-1.lock"


@pytest.mark.slow
def test_real_trainers_one_refused_one_queued_behind_a_trainer_killed_with_sigkill(
        tiny_sd, tmp_path):
    from train_fixtures import env, lora_cmd, make_dataset, metrics_steps, write_profile

    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "p.toml", tiny_sd, data, tmp_path / "out",
                         train={"max_steps": 2, "save_steps": 1})
    run = tmp_path / "out"
    first = subprocess.Popen(lora_cmd("train", "--config", path), stderr=subprocess.DEVNULL,
                             env=env(LORA_TEST_SAVE_PAUSE=5))
    try:
        assert wait_for(lambda: getattr(runlock.holder(run), "pid", None) == first.pid, 120,
                        first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(lora_cmd("train", "--config", path, "--json"),
                                capture_output=True, text=True, timeout=120, env=env())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"already training in PID {first.pid} on {socket.gethostname()}" in second.stderr
        assert f"`lora train --config {path} --wait`" in second.stderr
        log = tmp_path / "queued.err"
        with open(log, "w") as err:
            queued = subprocess.Popen(lora_cmd("train", "--config", path, "--wait", "--json"),
                                      stdout=subprocess.PIPE, stderr=err, text=True, env=env())
        assert wait_for(lambda: "waiting: " in log.read_text(), 120, queued), log.read_text()
        assert queued.poll() is None  # queued while the first one holds the run
    finally:
        first.kill()  # SIGKILL, while it holds the lock: the lock must not outlive it
        first.wait()
    out, _ = queued.communicate(timeout=300)
    assert queued.returncode == 0, log.read_text()[-3000:]
    assert json.loads(out)["status"] == "finished"
    assert metrics_steps(run) == [1, 2]  # trained once, never by two at a time
