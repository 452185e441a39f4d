"""`lora demo`: the main job on the embedded tiny model, offline, with its artefacts."""

from __future__ import annotations

import json

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def test_demo_runs_offline_and_shows_its_artefacts(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--output", out, "--steps", "6", "--json")
    assert result.exit_code == 0, result.stderr
    r = json.loads(result.stdout)
    assert r["snippet"] == "<lora:demo:0.8>" and r["steps"] == 6
    lora = out / "run" / "demo.safetensors"
    assert r["lora"] == str(lora) and lora.is_file()
    assert Image.open(r["grid"]).size[0] > 200 and Image.open(r["loss_plot"]).size[0] > 200
    assert r["lora_loss"] < r["base_loss"]  # even six steps move the tiny model
    assert len(list((out / "data").glob("*.txt"))) == 12
    assert "tiny" in result.stderr and "lora fetch sd15" not in result.stdout


def test_demo_plain_output_and_rerun_replaces_its_own_folder(cli, tmp_path):
    out = tmp_path / "demo"
    first = cli("demo", "--output", out, "--steps", "2")
    assert first.exit_code == 0, first.stderr
    assert "lora file:" in first.stdout and "<lora:demo:0.8>" in first.stdout
    assert "lora fetch sd15 --mirror hf-mirror" in first.stderr  # the real next steps
    again = cli("demo", "--output", out, "--steps", "2")
    assert again.exit_code == 0, again.stderr


def test_demo_never_overwrites_a_folder_it_did_not_make(cli, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = cli("demo", "--output", precious)
    assert result.exit_code == 1 and "was not made by `lora demo`" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"
