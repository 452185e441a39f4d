"""A run trained for real by `lora train` (tiny SD1, CPU) exports to a kohya file that diffusers
loads with exactly the trained effect."""

from __future__ import annotations

import pytest
from export_fixtures import encoders, load_component, outputs, pipeline_outputs, reference_models

from loracli import runs

pytestmark = pytest.mark.slow

PROFILE = """
[model]
base = "{base}"
[data]
dir = "{data}"
resolution = 64
bucketing = false
trigger = "sks"
[lora]
rank = 4
alpha = 6
dropout = 0.0
train_text_encoder = true
[train]
max_steps = 2
batch_size = 1
learning_rate = 0.01
scheduler = "constant"
save_steps = 2
mixed_precision = "no"
output_dir = "{out}"
"""


def test_a_really_trained_run_exports_its_exact_effect(tmp_path, tiny_sd, cli):
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        pixels = (np.random.RandomState(i).rand(64, 64, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text("a red lighthouse")
    out = tmp_path / "out"
    (tmp_path / "p.toml").write_text(PROFILE.format(base=tiny_sd, data=data, out=out))
    trained = cli("train", "--config", tmp_path / "p.toml")
    assert trained.exit_code == 0, trained.stderr
    assert runs.latest(out).step == 2

    result = cli("export", out, "--dtype", "fp32", "--name", "real")
    assert result.exit_code == 0, result.stderr
    path, snippet = result.stdout.splitlines()
    assert path == str(out / "real.safetensors") and snippet == "<lora:real:0.8>"

    want = outputs(reference_models(out), "sd1")
    untrained = outputs({c: load_component(tiny_sd, c).eval() for c in ("unet", *encoders("sd1"))}, "sd1")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    pipe.load_lora_weights(path)
    got = pipeline_outputs(pipe, "sd1")
    for component in want:
        assert (want[component] - untrained[component]).abs().max().item() > 1e-2, component
        assert (got[component] - want[component]).abs().max().item() <= 1e-6, component
