"""Several machines through accelerate: the layout from flags, profile and accelerate config; the
checks each worker makes at start; and two "machines" on localhost (two `lora train` with machine
ranks 0 and 1, gloo on the CPU) that train, are killed, resume and equal one process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from train_fixtures import adapter_tensors, env, lora_cmd, make_dataset, wait_for, write_profile

from loracli import profiles
from loracli.errors import LoraError
from loracli.training import launch
from loracli.training import loop as training
from loracli.training import runs, worker


def _train(**keys):
    return profiles.parse({"train": keys}).train


def test_layout_takes_flags_over_the_profile_over_the_accelerate_config(tmp_path):
    config = tmp_path / "node1.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\n"
                      "num_machines: 4\nmachine_rank: 3\nmain_process_ip: 10.0.0.1\n"
                      "main_process_port: 7000\n", "utf-8")
    from_file = launch.layout(_train(accelerate_config=str(config)))
    assert (from_file.machines, from_file.machine_rank, from_file.main_process_ip,
            from_file.main_process_port) == (4, 3, "10.0.0.1", 7000)
    profile = _train(accelerate_config=str(config), num_machines=2, machine_rank=1, processes=2)
    mixed = launch.layout(profile, main_process_port=9000)
    assert (mixed.machines, mixed.machine_rank, mixed.main_process_port) == (2, 1, 9000)
    assert mixed.main_process_ip == "10.0.0.1" and mixed.world_size == 4
    flags = launch.layout(profile, machines=3, machine_rank=0, main_process_ip="h0")
    assert (flags.machines, flags.machine_rank, flags.main_process_ip) == (3, 0, "h0")
    assert flags.to_dict()["world_size"] == 6
    alone = launch.layout(_train())
    assert (alone.world_size, alone.main_process_port, alone.accelerate_config) == (1, 0, None)
    two = launch.layout(_train(num_machines=2, main_process_ip="h0"))
    assert two.main_process_port == 29500  # every machine must name the same port


def test_the_default_accelerate_config_is_honoured(isolated):
    default = isolated["tmp"] / "hf-home" / "accelerate" / "default_config.yaml"  # $HF_HOME
    default.parent.mkdir(parents=True)
    default.write_text("distributed_type: MULTI_GPU\nnum_machines: 2\nmachine_rank: 1\n"
                       "main_process_ip: 10.0.0.9\n", "utf-8")
    where = launch.layout(_train(processes=2))
    assert (where.accelerate_config, where.machines, where.machine_rank) == (default, 2, 1)
    assert (where.main_process_ip, where.main_process_port, where.world_size) == \
        ("10.0.0.9", 29500, 4)
    cmd = launch.command(isolated["tmp"], where)
    assert cmd[cmd.index("--config_file") + 1] == str(default)
    assert "--multi_gpu" not in cmd  # its distributed_type, not ours


def test_layout_mistakes_name_the_fix(tmp_path):
    with pytest.raises(LoraError, match="machine rank 2 is out of range for 2") as e:
        launch.layout(_train(num_machines=2, main_process_ip="h0"), machine_rank=2)
    assert "--machine-rank from 0 to 1" in e.value.hint
    with pytest.raises(LoraError, match="needs the address of machine 0") as e:
        launch.layout(_train(), machines=2)
    assert "--main-process-ip" in e.value.hint
    with pytest.raises(LoraError, match="no such accelerate config file") as e:
        launch.layout(_train(), accelerate_config=str(tmp_path / "none.yaml"))
    assert "accelerate config --config_file" in e.value.hint
    garbled = tmp_path / "garbled.yaml"
    garbled.write_text("num_machines: lots\n", "utf-8")
    with pytest.raises(LoraError, match="num_machines is 'lots', not what accelerate expects"):
        launch.layout(_train(), accelerate_config=str(garbled))


def test_command_of_machine_1_names_the_whole_world(tmp_path):
    where = launch.layout(_train(), processes=2, machines=2, machine_rank=1,
                          main_process_ip="10.1.1.1", main_process_port=6000)
    cmd = launch.command(tmp_path / "run", where)
    text = " ".join(cmd)
    assert "--num_processes 4 --num_machines 2" in text  # accelerate counts every machine's
    assert "--machine_rank 1 --main_process_ip 10.1.1.1 --main_process_port 6000" in text
    assert cmd[cmd.index("-m", 3) + 1] == "loracli.training.worker"
    assert "--processes 2 --num-machines 2 --machine-rank 1" in text
    assert where.flags() == (" --processes 2 --num-machines 2 --machine-rank 1 "
                             "--main-process-ip 10.1.1.1 --main-process-port 6000")


def _state(n, mode):
    from accelerate.utils import DistributedType

    return SimpleNamespace(num_processes=n, distributed_type=DistributedType[mode])


def test_a_world_other_than_the_one_asked_for_is_refused(monkeypatch):
    two_machines = launch.Layout(processes=1, machines=2, machine_rank=0)
    with pytest.raises(LoraError) as e:
        worker.check_world(two_machines, _state(3, "MULTI_CPU"))
    assert e.value.message == ("2 machines × 1 process = 2 training processes were asked for, "
                               "but accelerate started 3 (MULTI_CPU)")
    assert "same --processes and --num-machines" in e.value.hint
    fell_back = launch.Layout(processes=2, accelerate_config=Path("cfg.yaml"))
    with pytest.raises(LoraError, match=r"2 training processes were asked for, but accelerate "
                                        r"started 1 \(NO\)") as e:
        worker.check_world(fell_back, _state(1, "NO"))
    assert "distributed_type" in e.value.hint and "cfg.yaml" in e.value.hint
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(LoraError, match="machine 0 runs 2 processes; 1 per machine"):
        worker.check_world(two_machines, _state(2, "MULTI_CPU"))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("GROUP_RANK", "1")
    with pytest.raises(LoraError, match="machine 0 joined as machine 1"):
        worker.check_world(two_machines, _state(2, "MULTI_CPU"))
    monkeypatch.setenv("GROUP_RANK", "0")
    worker.check_world(two_machines, _state(2, "MULTI_CPU"))  # what was asked: no error


# ---------------------------------------------------------------- real processes (slow)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _machines(args_of, port, tmp_path, tag, **extra_env):
    """Start machine 0 and machine 1 (each its own process group); stdout/stderr to files."""
    procs = []
    for rank in (0, 1):
        out = open(tmp_path / f"{tag}{rank}.out", "w")
        err = open(tmp_path / f"{tag}{rank}.err", "w")
        procs.append(subprocess.Popen(
            lora_cmd(*args_of(rank), "--num-machines", 2, "--machine-rank", rank,
                     "--main-process-ip", "127.0.0.1", "--main-process-port", port, "--json"),
            stdout=out, stderr=err, env=env(**extra_env), start_new_session=True))
    return procs


def _everything(procs):
    import psutil

    return [psutil.Process(p.pid) for p in procs] + [
        c for p in procs for c in psutil.Process(p.pid).children(recursive=True)]


def _signal(processes, sig):
    for proc in processes:
        try:
            proc.send_signal(sig)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _finish(procs, tmp_path, tag):
    for p in procs:
        p.wait(timeout=300)
    return [(p.returncode, (tmp_path / f"{tag}{r}.out").read_text(),
             (tmp_path / f"{tag}{r}.err").read_text()) for r, p in enumerate(procs)]


@pytest.mark.slow
def test_two_machines_on_localhost_train_are_killed_resume_and_equal_one_process(
        tiny_sd, tmp_path):
    data = make_dataset(tmp_path / "data", n=4)
    common = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-4}
    one = write_profile(tmp_path / "one.toml", tiny_sd, data, tmp_path / "one",
                        train={**common, "batch_size": 2})
    two = write_profile(tmp_path / "two.toml", tiny_sd, data, tmp_path / "two",
                        train={**common, "batch_size": 1})
    run = tmp_path / "two"
    # each save pauses 3 s before it completes: after step 2 is saved, a window to stop the job
    procs = _machines(lambda r: ("train", "--config", two), _free_port(), tmp_path, "a",
                      LORA_TEST_SAVE_PAUSE=3)
    assert wait_for(lambda: (runs.checkpoint_dir(run, 2) / "COMPLETE").is_file(), 240,
                    procs[0]), (tmp_path / "a0.err").read_text()[-3000:]
    job = _everything(procs)  # the workers run in sessions of their own (torch elastic)
    _signal(job, signal.SIGSTOP)
    try:
        # the job holds the run: an unrelated second `lora train` of it is refused
        second = subprocess.run(lora_cmd("train", "--config", two), capture_output=True,
                                text=True, timeout=120, env=env())
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"{run} is already training in PID {procs[0].pid}" in second.stderr
    finally:
        _signal(job, signal.SIGKILL)
        for p in procs:
            p.wait()
    assert [c.step for c in runs.checkpoints(run) if c.complete] == [2]

    results = _finish(_machines(lambda r: ("resume", run), _free_port(), tmp_path, "b"),
                      tmp_path, "b")
    for rank, (code, out, err) in enumerate(results):
        assert code == 0, err[-3000:]
        report = json.loads(out)
        assert (report["status"], report["step"], report["resumed_from"]) == ("finished", 4, 2)
        assert report["launch"] == {"processes": 1, "num_machines": 2, "machine_rank": rank,
                                    "main_process_ip": "127.0.0.1", "world_size": 2,
                                    "main_process_port": report["launch"]["main_process_port"],
                                    "accelerate_config": None}
    assert "resuming" in results[1][2] and "as machine 1 of 2" in results[1][2]
    reports = [json.loads(out) for _, out, _ in results]  # machine 0 wrote it; 1 names it
    assert reports[0]["checkpoint"] == reports[1]["checkpoint"] == str(runs.latest(run).path)
    state = json.loads((runs.checkpoint_dir(run, 4) / "state.json").read_text())
    assert (state["processes"], state["global_batch"]) == (2, 2)
    assert [m for m in _metric_steps(run)] == [1, 2, 3, 4]  # the killed job's extra lines trimmed

    run_one, _ = runs.start(profiles.load(str(one)))
    training.run(run_one)
    a = adapter_tensors(runs.latest(run_one).path)
    b = adapter_tensors(runs.latest(run).path)
    assert sorted(a) == sorted(b)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    moved = max(a[k].abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-4 and diff < 1e-5, (moved, diff)


def _metric_steps(run: Path) -> list[int]:
    lines = (run / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.strip()]


@pytest.mark.slow
def test_an_accelerate_config_that_starts_fewer_processes_is_refused(tiny_sd, tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "p.toml", tiny_sd, data, tmp_path / "out")
    config = tmp_path / "single.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: 'NO'\n"
                      "mixed_precision: 'no'\nnum_machines: 1\nnum_processes: 1\n", "utf-8")
    proc = subprocess.run(lora_cmd("train", "--config", path, "--processes", 2,
                                   "--accelerate-config", config),
                          capture_output=True, text=True, timeout=240, env=env())
    assert proc.returncode == 1
    assert "error: 2 training processes were asked for, but accelerate started 1 (NO)" \
        in proc.stderr
    assert f"check distributed_type, num_processes and num_machines in {config}" in proc.stderr
    assert runs.checkpoints(tmp_path / "out") == []


@pytest.mark.slow
def test_a_run_folder_that_another_machine_cannot_see_is_named(tiny_sd, tmp_path):
    data = make_dataset(tmp_path / "data", n=2)
    # machine 1 looks for the run in another folder: what a folder not on shared storage is
    mine = write_profile(tmp_path / "p.toml", tiny_sd, data, tmp_path / "shared" / "run")
    theirs = write_profile(tmp_path / "q.toml", tiny_sd, data, tmp_path / "local" / "run")
    procs = _machines(lambda r: ("train", "--config", (mine, theirs)[r]), _free_port(),
                      tmp_path, "c", LORA_SHARED_TIMEOUT=2)
    for code, out, err in _finish(procs, tmp_path, "c"):
        assert code == 1, err[-3000:]
        assert (f"is not on storage every machine sees: machine 1 ({socket.gethostname()}) did "
                "not see machine 0's file there") in err
        assert "hint: put train.output_dir on a shared filesystem" in err
    assert runs.checkpoints(tmp_path / "shared" / "run") == []
