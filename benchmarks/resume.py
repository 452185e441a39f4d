"""Time from `lora resume` to its first new step, against a fresh `lora train` to its first step.

    .venv/bin/python benchmarks/resume.py              # tiny SD1 model, 3 repeats
    .venv/bin/python benchmarks/resume.py --base PATH  # any diffusers folder

Each repeat starts `lora train` (40 steps, a checkpoint every 10), notes when "step 1/40" is
printed, kills it with SIGKILL after step 23, then runs `lora resume` and notes when "step 21/40"
(the first step after the checkpoint at 20) is printed. Both are wall-clock times from starting
the process, so they include Python, torch and diffusers imports and model loading.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _until(cmd: list[str], marker: str, kill_after: str | None = None) -> float:
    """Seconds from start to the stderr line containing `marker`; SIGKILL at `kill_after`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                            env=dict(os.environ, HF_HUB_OFFLINE="1", NO_COLOR="1"))
    seen = None
    for line in proc.stderr:
        if seen is None and marker in line:
            seen = time.perf_counter() - t0
        if kill_after is not None and kill_after in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    if seen is None:
        sys.exit(f"{' '.join(cmd)}: never printed {marker!r} (exit {proc.returncode})")
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", help="diffusers folder (default: a tiny SD1 model)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=64)
    args = parser.parse_args()
    lora = [sys.executable, "-m", "loracli"]
    fresh, resumed = [], []
    with tempfile.TemporaryDirectory(prefix="lora-bench-resume-") as tmp:
        tmp = Path(tmp)
        from train import make_images

        base = args.base
        if base is None:
            from loracli import tiny

            base = str(tiny.build_tiny_sd(tmp / "tiny", "sd1"))
        data = make_images(tmp / "data", args.resolution, 8)
        for i in range(args.repeats):
            out = tmp / f"run{i}"
            profile = tmp / f"p{i}.toml"
            profile.write_text(
                f'[model]\nbase = "{base}"\n[data]\ndir = "{data}"\nresolution = {args.resolution}\n'
                f'[train]\nmax_steps = 40\nsave_steps = 10\nbatch_size = 2\n'
                f'mixed_precision = "no"\noutput_dir = "{out}"\n', "utf-8")
            fresh.append(_until(lora + ["train", "--config", str(profile)], "step 1/40",
                                kill_after="step 23/40"))
            resumed.append(_until(lora + ["resume", str(out)], "step 21/40", kill_after="step 21/40"))
            print(f"repeat {i + 1}: fresh start → step 1: {fresh[-1]:.2f} s; "
                  f"resume → step 21: {resumed[-1]:.2f} s", flush=True)
    print(f"median: fresh {statistics.median(fresh):.2f} s, resume {statistics.median(resumed):.2f} s "
          f"(overhead {statistics.median(resumed) - statistics.median(fresh):+.2f} s)")


if __name__ == "__main__":
    main()
