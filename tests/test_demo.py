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


def test_demo_never_overwrites_a_folder_it_did_not_make(cli, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    result = cli("demo", "--output", precious)
    assert result.exit_code == 1 and "was not made by `lora demo`" in result.stderr
    assert (precious / "notes.txt").read_text() == "keep me"


def test_ctrl_c_exits_130_a_rerun_continues_to_the_grid_and_a_third_replaces_it(cli, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "demo"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen([sys.executable, "-m", "loracli", "demo", "-o", str(out), "--steps",
                             "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=str(root)))
    for line in proc.stderr:  # Ctrl+C while the model loads: the first step ends the run
        if line.startswith("train:"):
            break
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 130, stderr
    stopped = json.loads(stdout)
    assert stopped["status"] == "interrupted" and stopped["steps"] == 1
    assert stopped["next"] == f"lora demo --output {out} --steps 2"
    assert f"`lora demo --output {out} --steps 2` continues it" in stderr
    assert "internal error" not in stderr and not (out / "before_after.png").exists()

    again = cli("demo", "--output", out, "--steps", "2")  # plain output this time
    assert again.exit_code == 0, again.stderr
    assert "continuing the demo's run from step 1" in again.stderr
    assert "lora file:" in again.stdout and "<lora:demo:0.8>" in again.stdout
    assert "lora fetch sd15 --mirror hf-mirror" in again.stderr  # the real next steps
    assert Image.open(out / "before_after.png").size[0] > 200

    third = cli("demo", "--output", out, "--steps", "2")  # a finished demo is replaced
    assert third.exit_code == 0, third.stderr
    assert "continuing" not in third.stderr
