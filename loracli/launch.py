"""Running a training run: in this process for one process, through `accelerate launch` for more.

`accelerate launch` starts N copies of `python -m loracli.launch RUN_DIR` (DDP: NCCL on GPUs,
gloo on the CPU). An existing accelerate config (`accelerate config`) is honoured: only the
process count is passed then. The main process writes the result to a JSON file the parent reads.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from loracli.errors import LoraError

INTERRUPTED = 130


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate_config() -> Path | None:
    from accelerate.commands.config import default_config_file

    path = Path(os.environ.get("ACCELERATE_CONFIG_FILE", default_config_file))
    return path if path.is_file() else None


def command(run_dir: Path, processes: int, extra_steps: int = 0, until_step: int = 0,
            result_file: Path | None = None) -> list[str]:
    """The `accelerate launch …` command line for `processes` workers."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes)]
    config = _accelerate_config()
    if config is not None:
        cmd += ["--config_file", str(config)]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
                "--main_process_port", str(_free_port())]
    cmd += ["-m", "loracli.launch", str(run_dir), "--extra-steps", str(extra_steps),
            "--until-step", str(until_step)]
    if result_file is not None:
        cmd += ["--result", str(result_file)]
    return cmd


def train(run_dir: Path, processes: int = 1, on_step: Callable | None = None,
          on_warning: Callable | None = None, stop=None, extra_steps: int = 0,
          until_step: int = 0, on_start: Callable | None = None,
          on_status: Callable | None = None):
    """Train `run_dir` with `processes` workers; returns `training.Result`."""
    from loracli import training

    if processes <= 1:
        return training.run(run_dir, on_step=on_step, on_warning=on_warning, stop=stop,
                            extra_steps=extra_steps, until_step=until_step, on_start=on_start,
                            on_status=on_status)
    with tempfile.TemporaryDirectory(prefix="lora-launch-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = command(run_dir, processes, extra_steps, until_step, result_file)
        # Ctrl+C reaches the workers through the process group; wait for them to save and exit.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = subprocess.call(cmd)
        finally:
            signal.signal(signal.SIGINT, previous)
        if not result_file.is_file():
            raise LoraError(f"the {processes} training processes failed (exit status {code})",
                            "see the messages above; `lora resume "
                            f"{run_dir}` continues from the last checkpoint")
        data = json.loads(result_file.read_text("utf-8"))
    if "error" in data:
        raise LoraError(data["error"], data.get("hint"), data.get("details"))
    return training.Result(Path(data["run"]), data["status"], data["step"], data["max_steps"],
                           Path(data["checkpoint"]) if data.get("checkpoint") else None,
                           data.get("loss"), data.get("resumed_from"))


def _worker(argv: list[str] | None = None) -> int:
    """One of N processes under `accelerate launch`; the main one reports on stderr."""
    from loracli import atomic, output, training

    parser = argparse.ArgumentParser(prog="python -m loracli.launch")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--extra-steps", type=int, default=0)
    parser.add_argument("--until-step", type=int, default=0)
    parser.add_argument("--result", type=Path)
    args = parser.parse_args(argv)
    main = os.environ.get("RANK", "0") == "0"
    stop = training.StopFlag()
    stop.install(output.note if main else None, abort_on_second=False)
    try:
        result = training.run(args.run_dir, on_step=plain_progress() if main else None,
                              on_warning=output.warn, stop=stop, extra_steps=args.extra_steps,
                              until_step=args.until_step)
        data, code = result.to_dict(), INTERRUPTED if result.status == "interrupted" else 0
    except LoraError as e:
        data, code = e.to_dict(), 1
    if main and args.result:
        atomic.write_json(args.result, data)
    return code


def plain_progress(every: int = 0) -> Callable[[dict], None]:
    """One line per step (or every `every` steps) and one per checkpoint, for logs and pipes."""
    from loracli import output

    def on_step(m: dict) -> None:
        n = every or max(1, m["max_steps"] // 100)
        if m["step"] % n == 0 or m["step"] == m["max_steps"] or "checkpoint" in m:
            output.note(f"step {m['step']}/{m['max_steps']}  epoch {m['epoch']:.2f}  "
                        f"loss {m['loss']:.4f} (avg {m['loss_smooth']:.4f})  lr {m['lr']:.2e}  "
                        f"{1 / m['seconds']:.2f} it/s  {m['images_per_s']:.1f} img/s  "
                        f"mem {m['memory_mib']:.0f} MiB")
        if "checkpoint" in m:
            output.note(f"saved {m['checkpoint']}")

    return on_step


if __name__ == "__main__":
    sys.exit(_worker())
