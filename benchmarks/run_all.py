"""Every figure the issues ask for, in one command (run by hand; a benchmark is not a test).

    .venv/bin/python benchmarks/run_all.py            # quick sizes (about 10 minutes on 2 cores)
    .venv/bin/python benchmarks/run_all.py --full     # the issues' sizes (500 MB fetch, SD1.5 shape)

Each benchmark runs in its own process and prints its own table; ratios are against a reference
measured in the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUICK = [
    ("start-up", ["startup.py", "15"]),
    ("fetch", ["fetch.py", "--mb", "100", "--rounds", "1"]),
    ("caption", ["caption.py", "--images", "32", "--models", "tiny"]),
    ("training", ["train.py", "--only", "tiny"]),
    ("resume", ["resume.py", "--repeats", "2"]),
]
FULL = [
    ("start-up", ["startup.py", "15"]),
    ("fetch", ["fetch.py", "--mb", "500", "--rounds", "3"]),
    ("caption", ["caption.py", "--images", "64"]),
    ("training", ["train.py"]),
    ("loop overhead", ["overhead.py"]),
    ("resume", ["resume.py"]),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the sizes the issues name")
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(n for n, _ in QUICK))
    args = parser.parse_args()
    plan = FULL if args.full else QUICK
    wanted = set(args.only.split(",")) if args.only else None
    failed = []
    for name, argv in plan:
        if wanted and name not in wanted:
            continue
        print(f"\n=== {name}: benchmarks/{' '.join(argv)}", flush=True)
        t = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / argv[0]), *argv[1:]])
        print(f"=== {name}: {time.perf_counter() - t:.0f} s, exit {code}", flush=True)
        if code:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
