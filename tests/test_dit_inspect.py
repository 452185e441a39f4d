"""`lora inspect` on FLUX.1/SD3.5 kohya exports: the denoiser is the `transformer` (kohya names
it `lora_unet_` for every model) and the base version is the family's, with metadata or without.
"""

from __future__ import annotations

import json

import pytest

from dit_fixtures import tiny_dit_folder

from loracli import families
from train_fixtures import make_dataset, write_profile

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kind,family,version,encoders", [
    ("flux-dev", "flux-dev", "flux1", ["text_encoder"]),
    ("sd3", "sd35-medium", "5-medium", ["text_encoder", "text_encoder_2"])])
def test_inspect_names_the_transformer_and_the_family_version(kind, family, version, encoders,
                                                              tmp_path, tmp_path_factory, cli):
    from safetensors.torch import load_file, save_file

    base = tiny_dit_folder(tmp_path_factory, kind)
    data = make_dataset(tmp_path / "data", n=2)
    path = write_profile(tmp_path / "p.toml", base, data, tmp_path / "out",
                         lora={"targets": list(families.get(family).unet_targets),
                               "train_text_encoder": True},
                         train={"max_steps": 1, "save_steps": 1, "batch_size": 1})
    assert cli("train", "--config", str(path)).exit_code == 0
    lora = tmp_path / "lora.safetensors"
    r = cli("export", str(tmp_path / "out"), "--format", "kohya", "-o", str(lora))
    assert r.exit_code == 0, r.stderr
    r = cli("inspect", str(lora), "--json")
    assert r.exit_code == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["format"] == "kohya" and report["base_model_version"] == version
    assert sorted(report["modules"]) == sorted(["transformer", *encoders])  # never "unet"
    assert report["modules"]["transformer"] > 0

    bare = tmp_path / "bare.safetensors"  # the same tensors, no metadata (another trainer's file)
    save_file(load_file(str(lora)), str(bare))
    report = json.loads(cli("inspect", str(bare), "--json").stdout)
    assert sorted(report["modules"]) == sorted(["transformer", *encoders])
    # FLUX.1 dev and schnell share "flux1"; SD3.5 medium and large cannot be told apart from
    # the keys alone, and must not be mistaken for SDXL (two text encoders too)
    assert report["base_model_version"] == ("flux1" if kind != "sd3" else "unknown")
    r = cli("inspect", str(lora))
    assert r.exit_code == 0 and "transformer" in r.stdout and "unet" not in r.stdout
