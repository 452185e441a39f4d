"""Running a training run: in this process for one process, through `accelerate launch` for more.

`accelerate launch` starts the workers, `python -m loracli.training.worker RUN_DIR` (DDP: NCCL on GPUs,
gloo on the CPU), `processes` on each of `num_machines` machines. Every machine runs the same
`lora train` with its own `--machine-rank`; machine 0 creates or resumes the run folder, which
must be on storage every machine sees. An accelerate config file (`--accelerate-config`, or the
one `accelerate config` wrote) is honoured: a setting left at its default takes the file's value.

What each worker checks before it trains is in `loracli.training.worker`; its local main process writes
the result to a JSON file that the launcher here reads.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError

INTERRUPTED = 130
DEFAULT_PORT = 29500  # accelerate's and torchrun's, when several machines must agree on one


@dataclass(frozen=True)
class Layout:
    """Where the training processes run: `processes` on each of `machines` machines."""

    processes: int = 1
    machines: int = 1
    machine_rank: int = 0
    main_process_ip: str = ""
    main_process_port: int = 0
    accelerate_config: Path | None = None

    @property
    def world_size(self) -> int:
        return self.processes * self.machines

    def describe(self) -> str:
        per = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        return per if self.machines == 1 else f"{self.machines} machines × {per}"

    def flags(self) -> str:
        """The command-line options that give this layout (for hints)."""
        out = f" --processes {self.processes}" if self.processes != 1 else ""
        if self.machines > 1:
            out += (f" --num-machines {self.machines} --machine-rank {self.machine_rank} "
                    f"--main-process-ip {self.main_process_ip} "
                    f"--main-process-port {self.main_process_port}")
        if self.accelerate_config:
            out += f" --accelerate-config {self.accelerate_config}"
        return out

    def to_dict(self) -> dict:
        return {"processes": self.processes, "num_machines": self.machines,
                "machine_rank": self.machine_rank, "main_process_ip": self.main_process_ip,
                "main_process_port": self.main_process_port, "world_size": self.world_size,
                "accelerate_config": str(self.accelerate_config) if self.accelerate_config
                else None}


def _default_accelerate_config() -> Path | None:
    """The file `accelerate config` writes (its own rule, without importing accelerate)."""
    named = os.environ.get("ACCELERATE_CONFIG_FILE")
    if named:
        path = Path(named).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME", "~/.cache")
        home = Path(os.environ.get("HF_HOME", os.path.join(cache, "huggingface"))).expanduser()
        path = home / "accelerate" / "default_config.yaml"
    return path if path.is_file() else None


def _read_accelerate_config(path: Path) -> dict:
    import yaml  # JSON is YAML too

    try:
        data = yaml.safe_load(path.read_text("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise LoraError(f"{path}: cannot read this accelerate config ({type(e).__name__})",
                        f"write it again with `accelerate config --config_file {path}`") from None
    return data if isinstance(data, dict) else {}


def layout(train, processes: int | None = None, machines: int | None = None,
           machine_rank: int | None = None, main_process_ip: str | None = None,
           main_process_port: int | None = None, accelerate_config: str | None = None) -> Layout:
    """The layout from the command line, else the profile's [train], else the accelerate config."""
    named = accelerate_config or train.accelerate_config
    config = Path(named).expanduser() if named else _default_accelerate_config()
    if config is not None and not config.is_file():
        raise LoraError(f"{config}: no such accelerate config file",
                        f"write one with `accelerate config --config_file {config}`, or leave "
                        "out --accelerate-config (train.accelerate_config)")
    file = _read_accelerate_config(config) if config else {}

    def pick(given, profile_value, default, key):
        if given is not None:
            return given
        if profile_value != default:
            return profile_value
        value = file.get(key)
        try:
            return default if value in (None, "") else type(default)(value)
        except (TypeError, ValueError):
            raise LoraError(f"{config}: {key} is {value!r}, not what accelerate expects",
                            f"write it again with `accelerate config --config_file {config}`"
                            ) from None

    n = pick(machines, train.num_machines, 1, "num_machines")
    rank = pick(machine_rank, train.machine_rank, 0, "machine_rank")
    ip = pick(main_process_ip, train.main_process_ip, "", "main_process_ip")
    port = pick(main_process_port, train.main_process_port, 0, "main_process_port")
    if n < 1:
        raise LoraError(f"num_machines is {n}; it must be at least 1", "--num-machines 1")
    if not 0 <= rank < n:
        raise LoraError(f"machine rank {rank} is out of range for {n} machine(s)",
                        f"give each machine its own --machine-rank from 0 to {n - 1} "
                        "(0 on the main machine)")
    if n > 1 and not ip:
        raise LoraError(f"training on {n} machines needs the address of machine 0",
                        "add --main-process-ip ADDRESS (machine 0's address, reachable from "
                        "every machine) to the command on every machine")
    return Layout(processes or train.processes, n, rank, ip,
                  port or (DEFAULT_PORT if n > 1 else 0), config)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(run_dir: Path, where: Layout, extra_steps: int = 0, until_step: int = 0,
            result_file: Path | None = None) -> list[str]:
    """The `accelerate launch …` command line for this machine's workers."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--num_processes", str(where.world_size), "--num_machines", str(where.machines)]
    if where.accelerate_config is not None:
        cmd += ["--config_file", str(where.accelerate_config)]
    else:
        cmd += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if where.machines > 1:
        cmd += ["--machine_rank", str(where.machine_rank), "--main_process_ip",
                where.main_process_ip, "--main_process_port", str(where.main_process_port)]
    elif where.accelerate_config is None:
        cmd += ["--main_process_ip", where.main_process_ip or "127.0.0.1",
                "--main_process_port", str(where.main_process_port or _free_port())]
    cmd += ["-m", "loracli.training.worker", str(run_dir), "--extra-steps", str(extra_steps),
            "--until-step", str(until_step), "--processes", str(where.processes),
            "--num-machines", str(where.machines), "--machine-rank", str(where.machine_rank)]
    if where.accelerate_config is not None:
        cmd += ["--accelerate-config", str(where.accelerate_config)]
    if result_file is not None:
        cmd += ["--result", str(result_file)]
    return cmd


def train(run_dir: Path, processes: int | Layout = 1, on_step: Callable | None = None,
          on_warning: Callable | None = None, stop=None, extra_steps: int = 0,
          until_step: int = 0, keep_fds: tuple[int, ...] = (), on_start: Callable | None = None,
          on_status: Callable | None = None):
    """Train `run_dir` on `processes` (a count on this machine, or a `Layout`).

    Returns `training.Result`. `keep_fds` are passed to the launcher (the run lock: it stays
    held while the workers live, even if this process is killed). `on_start`/`on_status` are
    called in-process only (workers report steps through plain lines).
    """
    from loracli.training import loop as training

    where = processes if isinstance(processes, Layout) else Layout(processes=processes)
    if where.world_size <= 1:
        return training.run(run_dir, on_step=on_step, on_warning=on_warning, stop=stop,
                            extra_steps=extra_steps, until_step=until_step, on_start=on_start,
                            on_status=on_status)
    with tempfile.TemporaryDirectory(prefix="lora-launch-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = command(run_dir, where, extra_steps, until_step, result_file)
        # Ctrl+C reaches the workers through the process group; wait for them to save and exit.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = subprocess.call(cmd, pass_fds=keep_fds)
        finally:
            signal.signal(signal.SIGINT, previous)
        if not result_file.is_file():
            raise LoraError(f"the {where.describe()} training processes failed "
                            f"(exit status {code})",
                            "see the messages above; `lora resume "
                            f"{run_dir}{where.flags()}` continues from the last checkpoint")
        data = json.loads(result_file.read_text("utf-8"))
    if "error" in data:
        raise LoraError(data["error"], data.get("hint"), data.get("details"))
    return training.Result(Path(data["run"]), data["status"], data["step"], data["max_steps"],
                           Path(data["checkpoint"]) if data.get("checkpoint") else None,
                           data.get("loss"), data.get("resumed_from"))


def plain_progress(every: int = 0) -> Callable[[dict], None]:
    """One labelled line every few steps and one per checkpoint, for logs and pipes."""
    from loracli.ui import trainview

    return trainview.PlainView(every).on_step
