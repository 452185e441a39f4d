"""What a person sees while `lora train`, `lora resume` and `lora demo` train, all on stderr.

The trainer reports through callbacks (`on_start(info)`, `on_status(text)`, `on_step(metrics)`);
this module turns them into one of two views:

- `LiveView`, on a terminal: a header (run, family/base, images, resolution, batch, steps), a
  status line while the model loads and latents are cached, then labelled fields redrawn in
  place (step n/N with a bar, ETA, loss, epoch, lr, it/s, img/s, memory, elapsed), packed to
  the terminal's width so that step and ETA stay visible at any width;
- `PlainView`, for logs and pipes: the same header and labelled lines, one every few steps.

Speed and ETA are averaged over the last `WINDOW` steps, so one slow step (a checkpoint, a
sample) does not swing the estimate. `summary` is the closing block: total time, checkpoint,
loss curve and the export command.
"""

from __future__ import annotations

import re
import time
from collections import deque
from pathlib import Path

from loracli.ui import output

WINDOW = 20  # steps the speed and ETA are averaged over
UNITS = ("it/s", "img/s")  # fields whose label reads as a unit after the value
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def clock(seconds: float | None) -> str:
    """`0:02:05` (h:mm:ss); `-:--:--` when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Window:
    """Steps per second and images per second over the last `size` steps."""

    def __init__(self, size: int = WINDOW):
        self.steps: deque[tuple[float, float]] = deque(maxlen=size)  # (seconds, images)

    def add(self, seconds: float, images: float) -> None:
        if seconds > 0:
            self.steps.append((seconds, images))

    def rates(self) -> tuple[float | None, float | None]:
        total = sum(s for s, _ in self.steps)
        if not total:
            return None, None
        return len(self.steps) / total, sum(i for _, i in self.steps) / total


def header_parts(info: dict) -> list[str]:
    """What is being trained, from the trainer's `on_start` info, as short phrases."""
    base = info.get("base") or "?"
    family = info.get("family")
    parts = [f"training: run {info.get('run', '?')}",
             f"base {base}" + (f" ({family})" if family else "")]
    if info.get("images") is not None:
        parts.append(f"{info['images']} images")
    if info.get("resolution"):
        parts.append(f"{info['resolution']} px")
    if info.get("batch_size"):
        parts.append(f"batch {info['batch_size']}")
    planned = info.get("max_steps", "?")
    if isinstance(planned, str):  # "3 epochs", before the trainer has counted the steps
        parts.append(planned)
    elif info.get("start_step"):
        parts.append(f"steps {info['start_step']}→{planned}")
    else:
        parts.append(f"{planned} steps")
    if (info.get("processes") or 1) > 1:
        parts.append(f"{info['processes']} processes")
    return parts


def header(info: dict) -> str:
    return " · ".join(header_parts(info))


def pack(parts: list[str], width: int, sep: str = "  ") -> list[str]:
    """`parts` joined by `sep` into lines no wider than `width`; a part never splits unless it
    alone is too wide (then it is cut with …)."""
    lines, line = [], ""
    for part in parts:
        candidate = f"{line}{sep}{part}" if line else part
        if len(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = _fit(part, width)
    if line:
        lines.append(line)
    return lines


class View:
    """The state both views share: the header info, the last metrics, the speed window."""

    def __init__(self):
        self.started = time.monotonic()
        self.info: dict | None = None
        self.metrics: dict | None = None
        self.status: str | None = "loading the model and caching latents"
        self.window = Window()

    # --- the trainer's callbacks
    def on_start(self, info: dict) -> None:
        self.info = dict(info)
        self.say(header(self.info))

    def on_status(self, text: str) -> None:
        self.status = text

    def on_step(self, m: dict) -> None:
        self.metrics = m
        self.status = None
        seconds = m.get("seconds") or 0.0
        self.window.add(seconds, (m.get("images_per_s") or 0.0) * seconds)
        if "checkpoint" in m:
            self.say(f"saved {m['checkpoint']}")

    def say(self, message: str) -> None:
        output.note(message)

    # --- what is shown
    def fields(self) -> list[tuple[str, str]]:
        """(label, value) pairs, most important first: step and ETA lead at any width."""
        m = self.metrics
        if m is None:
            return []
        it_s, img_s = self.window.rates()
        left = m["max_steps"] - m["step"]
        eta = left / it_s if it_s else None
        return [("step", f"{m['step']}/{m['max_steps']}"), ("ETA", clock(eta)),
                ("loss", f"{m['loss_smooth']:.4f}"), ("epoch", f"{m['epoch']:.2f}"),
                ("lr", f"{m['lr']:.1e}"), ("it/s", f"{it_s:.2f}" if it_s else "-"),
                ("img/s", f"{img_s:.1f}" if img_s else "-"),
                ("memory", f"{m['memory_mib']:.0f} MiB"),
                ("elapsed", clock(time.monotonic() - self.started))]

    def labelled(self) -> list[str]:
        """The fields as people read them: `step 81/300`, `loss 0.0426`, but `4.98 it/s`."""
        return [f"{value} {label}" if label in UNITS else f"{label} {value}"
                for label, value in self.fields()]

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class PlainView(View):
    """Labelled lines for logs and pipes: the header, status changes, a line every few steps."""

    def __init__(self, every: int = 0):
        super().__init__()
        self.every = every
        self._phase, self._said = "", 0.0

    def on_status(self, text: str) -> None:
        """Each phase once, then its count ("caching latents 120/4000") at most every 5 s."""
        super().on_status(text)
        counted = re.match(r"^(.*?)\s*(\d+)/(\d+)$", text)
        phase = counted.group(1) if counted else text
        now = time.monotonic()
        if counted and phase == self._phase and counted.group(2) != counted.group(3) \
                and now - self._said < 5:
            return
        self._phase, self._said = phase, now
        self.say(text)

    def on_step(self, m: dict) -> None:
        super().on_step(m)
        n = self.every or max(1, m["max_steps"] // 100)
        if m["step"] % n == 0 or m["step"] == m["max_steps"] or "checkpoint" in m:
            self.say("  ".join(self.labelled()))


class LiveView(View):
    """A live block on a terminal, redrawn in place and packed to the current width."""

    def __init__(self):
        super().__init__()
        self.live = None

    def __enter__(self):
        from rich.live import Live

        console = output.console(stderr=True)
        self.live = Live(_Block(self), console=console, refresh_per_second=4, transient=False,
                         redirect_stdout=False, redirect_stderr=True)
        self.live.start()
        return self

    def __exit__(self, exc_type, *exc):
        if self.live is not None:
            if self.metrics or exc_type is not None:  # the status line has had its day
                self.status = None
            self.live.refresh()
            self.live.stop()
        return False

    def on_start(self, info: dict) -> None:
        self.info = dict(info)
        if self.live is None:
            return super().on_start(info)
        for line in pack(header_parts(self.info), self.live.console.width, " · "):
            self.say(line)

    def say(self, message: str) -> None:
        if self.live is not None:
            # wrapped at the terminal's width, at spaces (a long path folds)
            self.live.console.print(message, markup=False, highlight=False, soft_wrap=False)
        else:
            output.note(message)

    def lines(self, width: int) -> list[str]:
        """The block as plain lines no wider than `width` (the status line, then the fields)."""
        out = []
        if self.status:
            spin = SPINNER[int(time.monotonic() * 8) % len(SPINNER)]
            out.append(_fit(f"{spin} {self.status} · {clock(self.elapsed())}", width))
        fields = self.labelled()
        if not fields:
            return out
        step, eta, rest = fields[0], fields[1], fields[2:]
        m = self.metrics
        fraction = m["step"] / m["max_steps"] if m["max_steps"] else 1.0
        percent = f"{fraction * 100:3.0f}%"
        room = width - len(step) - len(eta) - len(percent) - 4
        if room >= 8:
            bar_width = min(room, 40)
            filled = int(round(bar_width * fraction))
            out.append(f"{step} {'━' * filled}{'╺' if filled < bar_width else ''}"
                       f"{'─' * max(0, bar_width - filled - 1)} {percent}  {eta}")
        elif len(step) + len(eta) + 2 <= width:
            out.append(f"{step}  {eta}")
        else:
            out += [_fit(step, width), _fit(eta, width)]
        out += pack(rest, width)
        return out


class _Block:
    """The rich renderable of a `LiveView`: laid out again at every refresh, at the live width."""

    def __init__(self, view: LiveView):
        self.view = view

    def __rich_console__(self, console, options):
        from rich.text import Text

        for line in self.view.lines(max(options.max_width, 10)):
            yield Text(line, no_wrap=True, overflow="ellipsis")


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def view(live: bool, every: int = 0) -> View:
    """A `LiveView` when `live` (a terminal), else a `PlainView`."""
    return LiveView() if live else PlainView(every)


def summary(result: dict, seconds: float, run_arg: str) -> list[str]:
    """The closing lines: what happened, in how long, and where the results are."""
    status, run = result["status"], Path(result["run"])
    plot = run / "loss.png"
    if status == "already-finished":
        return [f"{run} is finished (step {result['step']}/{result['max_steps']}); train longer "
                f"with `lora resume {run_arg} --steps 500`, or export it with "
                f"`lora export {run_arg}`"]
    if status == "interrupted":
        head = (f"stopped at step {result['step']}/{result['max_steps']} after {clock(seconds)}; "
                f"continue with `lora resume {run_arg}`")
    else:
        loss = f" (final loss {result['loss']:.4f})" if result.get("loss") is not None else ""
        head = f"finished {result['max_steps']} steps in {clock(seconds)}{loss}"
    lines = [head]
    if result.get("checkpoint"):
        lines.append(f"  checkpoint:  {result['checkpoint']}")
    if plot.is_file():
        lines.append(f"  loss curve:  {plot}")
    if status == "finished":
        lines.append(f"  export it:   lora export {run_arg}")
    return lines


def watch(train, live: bool, processes: int = 1, every: int = 0):
    """Call `train(on_step=…, on_warning=…, stop=…, on_start=…, on_status=…)` with a view on
    stderr; Ctrl+C finishes the step, saves and stops. Returns `(result, seconds)`.

    The live view needs this process to run the loop (one process); with more, the workers
    print plain lines themselves.
    """
    from loracli.training import loop as training

    stop = training.StopFlag()
    shown = view(live and processes <= 1, every)
    with stop.installed(output.note), shown:
        result = train(on_step=shown.on_step, on_warning=output.warn, stop=stop,
                       on_start=shown.on_start, on_status=shown.on_status)
    return result, shown.elapsed()


def report(result, seconds: float, run_arg: str, as_json: bool, where=None) -> int:
    """Print the outcome (summary on stderr, the checkpoint on stdout, or the JSON document);
    returns the exit status: 130 when Ctrl+C stopped the run after it saved."""
    document = result.to_dict()
    plot = Path(document["run"]) / "loss.png"
    document.update(seconds=round(seconds, 1), loss_plot=str(plot) if plot.is_file() else None,
                    export=f"lora export {run_arg}")
    if where is not None:
        document["launch"] = where.to_dict()

    def render(r: dict) -> None:
        for line in summary(r, seconds, run_arg):
            output.note(line)
        print(r["checkpoint"] or r["run"])

    output.emit(document, as_json, render)
    return 130 if result.status == "interrupted" else 0
