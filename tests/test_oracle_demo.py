"""`lora demo`'s before/after grid as a user looks at it: the LoRA row is not the base row
again, and it moved towards the training pictures (red discs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def _rows(grid_png) -> list[np.ndarray]:
    """The grid's three rows of pictures (training pictures, base, base + LoRA), labels cut off.

    The grid stacks three equal bands, each a one-line label over a row of pictures; the lower
    three quarters of a band are pictures only.
    """
    grid = np.asarray(Image.open(grid_png).convert("RGB")).astype(np.float64)
    band = grid.shape[0] // 3
    return [grid[i * band + band // 4:(i + 1) * band - 2] for i in range(3)]


def _red(row: np.ndarray) -> float:
    """Fraction of strongly red pixels (the discs the demo's LoRA learns)."""
    r, g, b = row[..., 0], row[..., 1], row[..., 2]
    return float(((r > 150) & (g < 100) & (b < 100)).mean())


def test_demo_grid_lora_row_differs_from_base_row(cli, tmp_path):
    result = cli("demo", "--output", tmp_path / "demo", "--steps", "2", "--json")
    assert result.exit_code == 0, result.stderr
    pictures, base, lora = _rows(json.loads(result.stdout)["grid"])
    assert _red(pictures) > 0.1  # the row detection sees the red discs of the training pictures
    assert np.abs(lora - base).mean() > 5.0, "the LoRA row is the base row drawn again"
    assert _red(lora) > _red(base) + 0.02
    assert np.abs(lora - pictures).mean() < np.abs(base - pictures).mean()
