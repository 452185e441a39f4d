"""The tiny FLUX.1/SD3.5 pipelines for the tests, each built once per test process (~5 s each).

Tests read these folders and never change them; a test that needs to change one copies it.
"""

from __future__ import annotations

from pathlib import Path

from loracli import tiny_dit

_BUILT: dict[str, Path] = {}


def tiny_dit_folder(tmp_path_factory, kind: str) -> Path:
    if kind not in _BUILT:
        folder = tmp_path_factory.getbasetemp() / f"tiny-{kind}"
        _BUILT[kind] = tiny_dit.build_tiny_dit(folder, kind)
    return _BUILT[kind]
