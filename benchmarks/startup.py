"""How fast `lora --help` starts (the promise: median under 250 ms), against bare Python.

Run by hand: .venv/bin/python benchmarks/startup.py [runs]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    lora = str(Path(sys.executable).with_name("lora"))
    base = timed([sys.executable, "-c", "pass"], runs)
    rows = {
        "python -c pass (reference)": base,
        "lora --help": timed([lora, "--help"], runs),
        "lora profile --help": timed([lora, "profile", "--help"], runs),
        "lora --version": timed([lora, "--version"], runs),
    }
    ref = statistics.median(base)
    print(f"{'command':32} {'median ms':>10} {'p90 ms':>8} {'x python':>9}")
    for name, times in rows.items():
        med = statistics.median(times)
        p90 = sorted(times)[int(0.9 * (len(times) - 1))]
        print(f"{name:32} {med * 1000:10.1f} {p90 * 1000:8.1f} {med / ref:9.2f}")


if __name__ == "__main__":
    main()
