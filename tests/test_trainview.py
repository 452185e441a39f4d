"""The live `lora train` display, as a person sees it: through a pseudo-terminal at 60 and 120
columns, replayed on a small terminal model (cursor moves, line erases, width); plain labelled
lines when stderr is not a terminal; speed and ETA averaged over a window."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from loracli.ui import trainview

ROOT = Path(__file__).resolve().parent.parent
CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


class Screen:
    """Just enough of a terminal to replay rich's live output: text, \\r, \\n, cursor up, erase
    line. `overflow` counts characters written past the right edge (a line too wide)."""

    def __init__(self, columns: int):
        self.columns, self.lines, self.row, self.col, self.overflow = columns, [""], 0, 0, 0
        self.frames: list[list[str]] = []

    def feed(self, text: str) -> "Screen":
        pos = 0
        for m in CSI.finditer(text):
            self._text(text[pos:m.start()])
            arg, op = m.group(1), m.group(2)
            if op in "AK":  # what was on screen before the live block is redrawn
                self.frames.append(list(self.lines))
            if op == "A":
                self.row = max(0, self.row - int(arg or 1))
            elif op == "K":
                self.lines[self.row] = ""
            pos = m.end()
        self._text(text[pos:])
        self.frames.append(list(self.lines))
        return self

    def _text(self, text: str) -> None:
        for ch in text:
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self.row, self.col = self.row + 1, 0
                if self.row == len(self.lines):
                    self.lines.append("")
            elif ch >= " ":
                if self.col >= self.columns:
                    self.overflow += 1
                line = self.lines[self.row].ljust(self.col)
                self.lines[self.row] = line[:self.col] + ch + line[self.col + 1:]
                self.col += 1

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.lines)


def in_pty(argv: list[str], columns: int, env: dict | None = None, cwd=None, timeout=300):
    """Run `argv` with stderr (and stdin) on a pseudo-terminal `columns` wide; stdout piped."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    full_env = dict(os.environ, COLUMNS=str(columns), LINES="30", TERM="xterm-256color",
                    PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.Popen(argv, stdin=slave, stdout=subprocess.PIPE, stderr=slave,
                            env=full_env, cwd=cwd)
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            raise TimeoutError(b"".join(chunks).decode("utf-8", "replace")[-2000:])
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=timeout)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace"), stdout


DRIVER = """
import time
from loracli.ui import output, trainview
view = trainview.LiveView()
with view:
    view.on_start({"run": "output/anime-style", "profile": "anime", "family": "sd1",
                   "base": "sd15", "images": 48, "resolution": 512, "batch_size": 4,
                   "max_steps": 300, "start_step": 0, "resumed": False, "processes": 1})
    view.on_status("caching latents 12/48")
    time.sleep(0.6)
    for step in range(1, 301):
        view.on_step({"step": step, "max_steps": 300, "epoch": step / 12, "loss": 0.05,
                      "loss_smooth": 0.0426, "lr": 1.7e-4, "seconds": 0.2,
                      "images_per_s": 20.0, "memory_mib": 874.0, "elapsed": step * 0.2,
                      **({"checkpoint": f"output/anime-style/checkpoints/step-{step:06d}"}
                         if step % 100 == 0 else {})})
        if step in (1, 150, 299):
            time.sleep(0.5)
"""


@pytest.mark.parametrize("columns", [60, 120])
def test_live_view_is_readable_at_any_width(columns):
    code, shown, _ = in_pty([sys.executable, "-c", DRIVER], columns)
    assert code == 0, shown
    screen = Screen(columns).feed(shown)
    assert screen.overflow == 0, "a line was wider than the terminal"
    text = screen.text()
    assert "training: run output/anime-style" in text and "48 images" in text
    assert "512 px" in text and "300 steps" in text and "base sd15 (sd1)" in text
    assert any("caching latents 12/48" in "\n".join(f) for f in screen.frames)  # before step 1
    assert "saved output/anime-style/checkpoints/step-000300" in text
    live = [f for f in screen.frames if any("step " in line and "/300" in line for line in f)]
    assert len(live) >= 3  # redrawn in place while training
    for frame in live:  # step n/N and the ETA stay visible, on the same line, at any width
        line = next(line for line in frame if re.search(r"step \d+/300", line))
        assert re.search(r"ETA \d:\d\d:\d\d", line), line
    last = "\n".join(live[-1])
    assert "step 300/300" in last and "100%" in last
    for label in ("loss 0.0426", "epoch 25.00", "lr 1.7e-04", "5.00 it/s", "20.0 img/s",
                  "memory 874 MiB", "elapsed"):
        assert label in last, label
    mid = "\n".join(next(f for f in live if any("step 150/300" in line for line in f)))
    assert "ETA 0:00:30" in mid  # 150 steps left at 5 it/s
    first = next(i for i, line in enumerate(live[-1]) if "step 300/300" in line)
    block = [line for line in live[-1][first:] if line.strip()]
    assert len(block) == (2 if columns >= 120 else 3), block  # every field, packed to the width


def test_plain_view_is_labelled_lines(capsys):
    view = trainview.PlainView(every=2)
    view.on_start({"run": "out/x", "base": "tiny-sd", "family": "sd1", "images": 6,
                   "resolution": 64, "batch_size": 2, "max_steps": 4, "start_step": 2,
                   "resumed": True, "processes": 1})
    view.on_status("caching latents")
    for step in (3, 4):
        view.on_step({"step": step, "max_steps": 4, "epoch": 1.0, "loss": 0.1,
                      "loss_smooth": 0.1, "lr": 1e-4, "seconds": 0.5, "images_per_s": 4.0,
                      "memory_mib": 10.0, "elapsed": 1.0})
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("training: run out/x · base tiny-sd (sd1) · 6 images · 64 px · batch 2 · "
                      "steps 2→4")
    assert err[1] == "caching latents"
    assert err[2].startswith("step 4/4  ETA 0:00:00  loss 0.1000  epoch 1.00  lr 1.0e-04  "
                             "2.00 it/s  4.0 img/s  memory 10 MiB  elapsed ")
    assert "\x1b[" not in "\n".join(err)


def test_plain_view_counts_a_long_phase_without_a_line_per_item(capsys):
    view = trainview.PlainView()
    view.on_status("loading the model")
    for i in range(4001):
        view.on_status(f"caching latents {i}/4000")
    view.on_status("caching text 0/3")
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["loading the model", "caching latents 0/4000"]
    assert "caching latents 4000/4000" in err and err[-1] == "caching text 0/3"
    assert len(err) < 10  # not 4000 lines in a log


def test_speed_and_eta_are_averaged_over_a_window():
    view = trainview.PlainView()
    m = {"max_steps": 1000, "epoch": 1.0, "loss": 0.1, "loss_smooth": 0.1, "lr": 1e-4,
         "images_per_s": 8.0, "memory_mib": 1.0, "elapsed": 0.0}
    etas = []
    for step in range(1, 70):
        seconds = 6.0 if step == 40 else 0.5  # one slow step (a checkpoint, a sample)
        view.on_step({**m, "step": step, "seconds": seconds, "images_per_s": 4 / seconds})
        etas.append(dict(view.fields())["ETA"])

    def secs(eta):
        h, mi, s = map(int, eta.split(":"))
        return h * 3600 + mi * 60 + s

    steady, after_slow = secs(etas[38]), secs(etas[39])
    assert after_slow < 1.7 * steady  # last-step speed alone would make it 12x
    assert dict(view.fields())["it/s"] == "2.00"  # the slow step has left the 20-step window
    assert dict(view.fields())["img/s"] == "8.0"


def test_summary_names_time_checkpoint_curve_and_export(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"png")
    lines = trainview.summary({"run": str(tmp_path), "status": "finished", "step": 300,
                               "max_steps": 300, "loss": 0.04, "checkpoint": "c/step-000300"},
                              125.0, "my-style")
    assert lines[0] == "finished 300 steps in 0:02:05 (final loss 0.0400)"
    assert f"loss curve:  {tmp_path / 'loss.png'}" in lines[2]
    assert lines[-1].strip() == "export it:   lora export my-style"


@pytest.mark.slow
def test_lora_train_and_resume_in_a_60_column_terminal(cli, tiny_sd, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from train_fixtures import make_dataset, write_profile

    data = make_dataset(tmp_path / "data", n=4)
    out = tmp_path / "out"
    profile = write_profile(tmp_path / "p.toml", tiny_sd, data, out,
                            train={"max_steps": 4, "save_steps": 2})
    env = {"OMP_NUM_THREADS": "1"}
    code, shown, stdout = in_pty([sys.executable, "-m", "loracli", "train", "--config",
                                  str(profile)], 60, env=env, cwd=tmp_path)
    assert code == 0, shown[-3000:]
    screen = Screen(60).feed(shown)
    text = screen.text()
    wide = {line for frame in screen.frames for line in frame if len(line.rstrip()) > 60}
    # long paths in plain lines may wrap (the terminal does it, copy-paste keeps them whole);
    # the live block, redrawn in place, never does
    assert not [line for line in wide if re.search(r"step \d+/4|ETA|loading the model", line)], wide
    assert "training: run" in text and "4 images" in text and "64 px" in text
    assert any("loading the model" in "\n".join(f) for f in screen.frames)  # before step 1
    assert re.search(r"step 4/4 .*ETA \d:\d\d:\d\d", text)
    assert re.search(r"finished 4 steps in \d:\d\d:\d\d", text)
    assert f"loss curve:  {out / 'loss.png'}".replace(" ", "") in text.replace("\n", "").replace(" ", "")
    assert "lora export" in text and "export it:" in text
    assert stdout.strip() == str(out / "checkpoints" / "step-000004")

    resumed = cli("resume", out, "--steps", "2", "--json")  # in-process: stderr is no terminal
    assert resumed.exit_code == 0, resumed.stderr
    assert f"resuming {out} from step 4" in resumed.stderr
    assert "steps 4→6" in resumed.stderr and "step 6/6" in resumed.stderr
    document = json.loads(resumed.stdout)
    assert document["step"] == 6 and document["resumed_from"] == 4
    assert document["loss_plot"] == str(out / "loss.png") and document["seconds"] > 0

