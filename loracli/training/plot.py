"""loss.png from logs/metrics.jsonl (matplotlib's Agg backend, imported only when drawing)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from loracli import atomic


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if Path(path).is_file():
        for line in Path(path).read_text("utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash
    return rows


def write(metrics_path: Path, png_path: Path) -> Path | None:
    """Draw the loss (raw and smoothed) against the step; None when there is nothing to draw."""
    rows = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    ax = fig.add_subplot()
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="#9ab", linewidth=0.8, label="loss")
    if all("loss_smooth" in r for r in rows):
        ax.plot(steps, [r["loss_smooth"] for r in rows], color="#c33", linewidth=1.6,
                label="smoothed")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(png_path, buf.getvalue())
    return Path(png_path)


class Redrawer:
    """Redraws loss.png in a background thread, so a checkpoint does not wait for matplotlib.

    `redraw()` starts a drawing (after the previous one ends); `wait()` ends the last one and
    raises what it raised (an OSError from a full disk, say).
    """

    def __init__(self, metrics_path: Path, png_path: Path):
        self.paths = (Path(metrics_path), Path(png_path))
        self.thread = None
        self.error: BaseException | None = None

    def _draw(self) -> None:
        try:
            write(*self.paths)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread by wait()
            self.error = e

    def redraw(self) -> None:
        import threading

        self.wait()
        self.thread = threading.Thread(target=self._draw, name="lora-plot", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        error, self.error = self.error, None
        if error is not None:
            raise error
