"""`lora fetch` vs `hf download` on a loopback hub serving a 500 MB file; resume after a kill.

Run by hand (not a test):  .venv/bin/python benchmarks/fetch.py [--mb 500] [--rounds 2]
Writes the file and the caches under a fresh /tmp folder and deletes it at the end. Prints:
- throughput of each client (best of --rounds, the two alternating) and their ratio;
- bytes each client transfers again when run after being killed at about half-way.
Both clients talk to the same server (tests/hubserver.py) in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import hubserver  # noqa: E402

REPO = "bench/big"
FILE = "unet/diffusion_pytorch_model.safetensors"


def env(work: Path, url: str) -> dict:
    e = dict(os.environ)
    for var in ("HF_HUB_OFFLINE", "HF_TOKEN", "LORA_MIRROR"):
        e.pop(var, None)
    e.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
             HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
             HF_HOME=str(work / "hf-home"), LORA_HOME=str(work / "lora-home"), NO_COLOR="1")
    return e


def lora_cmd(url: str, cache: Path) -> tuple[list, dict]:
    return ([sys.executable, "-m", "loracli", "fetch", REPO, "--mirror", url, "--strict"],
            {"LORA_CACHE": str(cache)})


def hf_cmd(url: str, cache: Path) -> tuple[list, dict]:
    return ([str(Path(sys.executable).with_name("hf")), "download", REPO, "--cache-dir", str(cache),
             "--quiet"], {})


def run(cmd, extra, work, url) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env={**env(work, url), **extra}, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def sent(hub, since: int) -> int:
    return sum(r["sent"] for r in hub.log[since:] if r.get("file") == FILE)


def kill_and_rerun(name, make, work, hub, size) -> dict:
    cache = work / f"{name}-killed"
    cmd, extra = make(hub, cache)
    blobs = cache / ("models--" + REPO.replace("/", "--")) / "blobs"
    hub.server.delay = 0.0005  # ~100 MB/s, so the kill lands near half-way
    start = len(hub.log)
    proc = subprocess.Popen(cmd, env={**env(work, hub), **extra}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    offset = 0
    while proc.poll() is None:
        parts = list(blobs.glob("*.incomplete")) if blobs.is_dir() else []
        offset = parts[0].stat().st_size if parts else 0
        if offset >= size // 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    time.sleep(0.5)  # let the server log the broken request
    hub.server.delay = 0
    first = sent(hub, start)
    mark = len(hub.log)
    run(cmd, extra, work, hub)
    again = sent(hub, mark)
    shutil.rmtree(cache, ignore_errors=True)
    return {"on_disk_at_kill": offset, "sent_before_kill": first, "sent_again": again}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lora-bench-", dir="/tmp"))
    try:
        folder = work / "repo"
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text("{}")
        size = args.mb * 1_000_000
        with open(folder / FILE, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1_000_000))
        hubserver.CHUNK = 1 << 20
        with hubserver.serve({REPO: folder}) as hub:
            hubserver.repo_listing(folder)  # hash once, outside the timings
            times = {"lora fetch": [], "hf download": []}
            for i in range(args.rounds):
                for name, make in (("lora fetch", lora_cmd), ("hf download", hf_cmd)):
                    cache = work / f"cache-{name.split()[0]}-{i}"
                    times[name].append(run(*make(hub, cache), work, hub))
                    shutil.rmtree(cache, ignore_errors=True)
            print(f"file: {size / 1e6:.0f} MB, {args.rounds} rounds, best of each")
            best = {k: min(v) for k, v in times.items()}
            for name, t in best.items():
                print(f"  {name:12s} {t:6.2f} s  {size / t / 1e6:7.1f} MB/s   (all: "
                      + ", ".join(f"{x:.2f}" for x in times[name]) + ")")
            print(f"  throughput ratio lora/hf: {best['hf download'] / best['lora fetch']:.2f}")
            for name, make in (("lora fetch", lora_cmd), ("hf download", hf_cmd)):
                r = kill_and_rerun(name.split()[0], make, work, hub, size)
                print(f"kill at ~50% then rerun, {name}: {r['on_disk_at_kill'] / 1e6:.0f} MB on disk at "
                      f"the kill; rerun transferred {r['sent_again'] / 1e6:.0f} MB "
                      f"({r['sent_again'] / size:.0%} of the file)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
