"""The whole path as the README types it: fetch through a mirror on 127.0.0.1, caption, make a
profile, train, SIGKILL, resume, export, and load the export into a diffusers pipeline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from hubserver import serve
from train_fixtures import env, metrics_steps, wait_for

pytestmark = pytest.mark.slow


def lora(*args, check=True, **kw):
    proc = subprocess.run([sys.executable, "-m", "loracli", *map(str, args)], env=env(),
                          capture_output=True, text=True, timeout=600, **kw)
    if check:
        assert proc.returncode == 0, f"lora {' '.join(map(str, args))}:\n{proc.stderr[-3000:]}"
    return proc


def make_pictures(folder, n=6):
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGB", (64, 64), (230, 230, 210))
        ImageDraw.Draw(im).ellipse((8 + 3 * i, 8 + 2 * i, 40 + 3 * i, 40 + 2 * i), fill=(220, 30, 40))
        im.save(folder / f"pic{i}.png")


def test_readme_walkthrough(tmp_path, tiny_sd, tiny_open_clip, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # fetch talks to the loopback mirror below

    # 1. lora fetch ORG/NAME --mirror URL  (a hub-compatible mirror on 127.0.0.1)
    with serve({"someorg/tiny-sd": tiny_sd}) as url:
        fetched = json.loads(lora("fetch", "someorg/tiny-sd", "--mirror", url, "--json").stdout)
    assert fetched["repo_id"] == "someorg/tiny-sd" and fetched["downloaded"] > 0
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # from here on nothing may use the network

    # 2. lora caption DIR --prefix TRIGGER
    data = tmp_path / "data" / "my_style"
    make_pictures(data)
    captioned = json.loads(lora("caption", data, "--weights", f"local-dir:{tiny_open_clip}",
                                "--prefix", "sks style", "--json").stdout)
    assert captioned and (data / "metadata.csv").is_file()
    assert all((data / f"pic{i}.txt").read_text().startswith("sks style") for i in range(6))

    # 3. lora profile new + --set overrides, 4. lora train, killed with SIGKILL mid-run
    lora("profile", "new", "my-style", "--from", "style")
    sets = ["--set", "model.base=someorg/tiny-sd", "--set", f"data.dir={data}",
            "--set", "data.resolution=64", "--set", "train.max_steps=6", "--set", "train.batch_size=2",
            "--set", "train.save_steps=2", "--set", "train.mixed_precision=no",
            "--set", "train.learning_rate=1e-3", "--set", "lora.rank=4",
            "--set", "train.output_dir=./output/{profile}"]
    lora("profile", "validate", "my-style", *sets)
    run_dir = tmp_path / "output" / "my-style"
    proc = subprocess.Popen([sys.executable, "-m", "loracli", "train", "--profile", "my-style",
                             *sets], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for(lambda: 3 in metrics_steps(run_dir), 300, proc), proc.stderr.read()[-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    # 5. lora resume RUN finishes it
    resumed = json.loads(lora("resume", "output/my-style", "--json").stdout)
    assert resumed["status"] == "finished" and resumed["step"] == 6
    assert resumed["resumed_from"] in (2, 4)

    # 6. lora export RUN → the WebUI file and its prompt snippet
    exported = lora("export", "output/my-style", "--dtype", "fp32")
    assert "<lora:my-style:0.8>" in exported.stdout + exported.stderr
    lora_file = run_dir / "my-style.safetensors"
    assert lora_file.is_file()
    info = json.loads(lora("inspect", lora_file, "--json").stdout)
    assert info["format"] == "kohya"

    # 7. diffusers loads it and the LoRA changes the output
    import torch
    from diffusers import StableDiffusionPipeline

    from loracli.hub import models

    pipe = StableDiffusionPipeline.from_pretrained(models.local_snapshot("someorg/tiny-sd"),
                                                   local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def image():
        g = torch.Generator().manual_seed(0)
        return pipe("sks style, a red circle", num_inference_steps=3, height=64, width=64,
                    generator=g, output_type="np").images[0]

    before = image()
    pipe.load_lora_weights(str(lora_file), adapter_name="mine")
    after = image()
    pipe.set_adapters(["mine"], adapter_weights=[0.0])
    off = image()
    assert abs(after - before).max() > 1e-3  # the LoRA does something …
    assert abs(off - before).max() < 1e-5    # … and only the LoRA does it
