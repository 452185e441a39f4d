"""`lora doctor`: what is installed, which device, where the cache is, which mirror is default."""

from __future__ import annotations

from loracli.ui import output
from loracli.ui.options import JsonOpt


def doctor(json: JsonOpt = False) -> None:
    """Check the installation: Python, torch, CUDA/MPS, accelerate, cache, disk, mirror."""
    from loracli import diagnostics

    report = diagnostics.collect()
    output.emit(report, json, _render)


def _render(report: dict) -> None:
    rows = [{"check": k, "value": v} for k, v in diagnostics_rows(report)]
    output.table(rows, ["check", "value"])


def diagnostics_rows(report: dict):
    for key, value in report.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                yield f"{key}.{sub}", v
        else:
            yield key, value
