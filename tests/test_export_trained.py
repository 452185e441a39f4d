"""A run trained for real by `lora train` (tiny SD1, CPU) exports to a kohya file that diffusers
loads with exactly the trained effect."""

from __future__ import annotations

from pathlib import Path

import pytest
from export_fixtures import encoders, load_component, outputs, pipeline_outputs, reference_models

from loracli.training import runs

pytestmark = pytest.mark.slow

PROFILE = """
[model]
base = "{base}"
[data]
dir = "{data}"
resolution = 64
bucketing = true
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

    _check_metadata(Path(path), tmp_path, data)


def _check_metadata(path, tmp_path, data):
    """What sd-scripts would write for this run (3 images, batch 1, 2 steps: epoch 1 of 1)."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_epoch"], meta["ss_num_epochs"], meta["ss_steps"]) == ("1", "1", "2")
    assert meta["ss_num_batches_per_epoch"] == "3" and meta["ss_total_batch_size"] == "1"
    assert json.loads(meta["ss_dataset_dirs"]) == {"data": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_num_train_images"] == "3"
    assert json.loads(meta["ss_bucket_info"]) == {"buckets": {"0": {"resolution": [64, 64], "count": 3}},
                                                  "mean_img_ar_error": 0.0}
    assert json.loads(meta["ss_tag_frequency"]) == {"data": {"sks": 3, "a red lighthouse": 3}}
    assert meta["ss_session_id"].isdigit()
    assert float(meta["ss_training_started_at"]) <= float(meta["ss_training_finished_at"])
    assert meta["ss_sd_model_name"] == Path(meta["loracli.base_model"]).name
    # sd-scripts' precalculate_safetensors_hashes: the file saved with its ss_* keys only
    tensors = load_file(str(path))
    ss_only = save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")})
    assert meta["sshs_legacy_hash"] == hashlib.sha256(ss_only[0x100000:0x110000]).hexdigest()[:8]
    raw = Path(path).read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    local = [v for v in meta.values() if str(tmp_path) in v or str(data) in v]
    assert not local
