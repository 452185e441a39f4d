"""`lora fetch flux-dev` (and the other DiT aliases) through a loopback hub: the gated repo needs
HF_TOKEN, only the diffusers folders come down, and the result is a base `lora train` accepts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from dit_fixtures import tiny_dit_folder
from hub_fixtures import online  # noqa: F401
from hubserver import serve

from loracli.families import loading
from loracli.hub import models

pytestmark = pytest.mark.slow


def test_aliases_name_the_real_repos():
    assert {a: models.resolve(a).repo_id for a in ("flux-dev", "flux-schnell", "sd35-medium",
                                                    "sd35-large")} == {
        "flux-dev": "black-forest-labs/FLUX.1-dev",
        "flux-schnell": "black-forest-labs/FLUX.1-schnell",
        "sd35-medium": "stabilityai/stable-diffusion-3.5-medium",
        "sd35-large": "stabilityai/stable-diffusion-3.5-large"}


def test_fetch_flux_dev_needs_the_token_and_gives_a_trainable_base(cli, online, isolated,  # noqa: F811
                                                                   tmp_path, tmp_path_factory,
                                                                   monkeypatch):
    repo = Path(shutil.copytree(tiny_dit_folder(tmp_path_factory, "flux-dev"), tmp_path / "repo"))
    # what the real repo also ships at its root: a 23 GB single file nobody needs for training
    shutil.copy(next((repo / "transformer").glob("*.safetensors")), repo / "flux1-dev.safetensors")
    secret = "hf_gatedFLUXtoken"
    with serve({"black-forest-labs/FLUX.1-dev": repo}, token=secret) as url:
        denied = cli("fetch", "flux-dev", "--mirror", url, "--strict")
        assert denied.exit_code == 1 and "HF_TOKEN" in denied.stderr
        monkeypatch.setenv("HF_TOKEN", secret)
        ok = cli("fetch", "flux-dev", "--mirror", url, "--json")
        assert ok.exit_code == 0, ok.stderr
    assert secret not in denied.stderr + ok.stdout + ok.stderr
    snapshot = models.local_snapshot("flux-dev")
    assert json.loads(ok.stdout)["snapshot"] == str(snapshot)
    assert not (snapshot / "flux1-dev.safetensors").exists()
    assert (snapshot / "tokenizer_2" / "tokenizer.json").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = loading.resolve_base("flux-dev")
    assert (base.family, base.prediction_type, base.repo) == \
        ("flux-dev", "flow_matching", "black-forest-labs/FLUX.1-dev")
